//! The SVG chart: each merge's score against its density, one line per strategy and weight set
//! (merges that differ only in density). The score is the min kept over tasks when any merge has
//! one, else the mean score over tasks; the title says which. Strategies that ignore the density
//! (`linear`, `cat`, `svd`) are drawn as flat lines across the whole density axis.

use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::report::{Report, SystemReport};
use crate::systems::uses_density;

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 600);

/// Line colours (Tableau 10: distinguishable, readable on white), cycled.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry (the merge label without the density).
    pub name: String,
    /// (density, score) points, by density; a single point with `None` density for flat lines.
    pub points: Vec<(Option<f64>, f64)>,
}

/// What the chart plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The min kept over tasks.
    MinKept,
    /// The mean score over tasks.
    MeanScore,
}

impl Metric {
    fn describe(self) -> &'static str {
        match self {
            Self::MinKept => "min kept over tasks (merge score / best single adapter)",
            Self::MeanScore => "mean score over tasks",
        }
    }

    fn value(self, row: &SystemReport) -> Option<f64> {
        match self {
            Self::MinKept => row.min_kept(),
            Self::MeanScore => Some(row.mean),
        }
    }
}

/// Picks the metric and groups the merges into lines, in row order.
pub fn series(report: &Report, adapters: &[String]) -> (Metric, Vec<Series>) {
    let metric = if report.systems.iter().any(|r| r.min_kept().is_some()) {
        Metric::MinKept
    } else {
        Metric::MeanScore
    };
    let mut lines: Vec<Series> = Vec::new();
    for row in &report.systems {
        let crate::systems::SystemKind::Merge { merged_adapters } = &row.kind else {
            continue;
        };
        if row.refused.is_some() {
            continue;
        }
        let Some(y) = metric.value(row) else {
            continue;
        };
        let density = merged_adapters
            .density
            .filter(|_| uses_density(&merged_adapters.strategy()));
        let name = merged_adapters.series_label(adapters);
        match lines.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((density, y)),
            None => lines.push(Series {
                name,
                points: vec![(density, y)],
            }),
        }
    }
    for s in &mut lines {
        s.points
            .sort_by(|a, b| a.0.unwrap_or(0.0).total_cmp(&b.0.unwrap_or(0.0)));
    }
    (metric, lines)
}

/// Renders the chart as an SVG document.
pub fn render_svg(report: &Report, adapters: &[String]) -> Result<String, String> {
    let (metric, lines) = series(report, adapters);
    let y_max = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max)
        * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("medley eval: {} vs density", metric.describe()),
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0_f64..1.0_f64, 0.0_f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("density")
            .y_desc(match metric {
                Metric::MinKept => "min kept",
                Metric::MeanScore => "mean score",
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, line) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            if let [(None, y)] = line.points.as_slice() {
                // A strategy without a density: one dashed level across the axis.
                let style = color.stroke_width(2);
                chart
                    .draw_series(DashedLineSeries::new([(0.0, *y), (1.0, *y)], 8, 5, style))
                    .map_err(|e| e.to_string())?
                    .label(line.name.as_str())
                    .legend(move |(x, y)| {
                        DashedPathElement::new([(x, y), (x + 20, y)], 5, 3, style)
                    });
                continue;
            }
            let points: Vec<(f64, f64)> = line
                .points
                .iter()
                .map(|&(x, y)| (x.unwrap_or(0.0), y))
                .collect();
            // A lone point (one density) gets a bigger marker, so a line through it stays visible.
            let radius = if points.len() == 1 { 6 } else { 3 };
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(line.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&p| Circle::new(p, radius, color.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
