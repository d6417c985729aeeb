//! [`LoraDelta`] for the [`AdapterStore`]: adds `x Aᵀ (s Bᵀ)` to the rows of every projection
//! whose slot holds an adapter with that module.
//!
//! The rows were grouped once for the step ([`RowSlots`]). The kernel path hands the runs of
//! consecutive rows to [`add_lora_parts`] as SGMV segments (prefill) or, when every run is one
//! row long (decode), as a BGMV row table: `medley_kernels` on the CPU, its CUDA kernels on a
//! GPU, reading the activations and the slot factors in place. Stacked projections (q/k/v,
//! gate/up as one product) go through in one call, each slot with or without each module. The
//! candle path gathers each slot's rows with `index_select`, multiplies, and scatters with
//! `index_add`. In half precision the product runs in f32 and is added to the f32-widened base
//! output, which is rounded once.

use candle_core::Tensor;
use medley_kernels::{NO_ADAPTER, Segment};

use super::lora_op::{KernelRows, LoraFactors, PartFactors, add_lora_parts};
use super::store::{AdapterStore, LoraBackend};
use super::weights::{DeviceModule, LORA_DTYPE, SlotAdapter};
use crate::model::lora::split_columns;
use crate::model::row_span::RowSpan;
use crate::model::{LoraDelta, RowSlots, TargetModule};

impl LoraDelta for AdapterStore {
    fn apply(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        y: Tensor,
        rows: &RowSlots,
    ) -> candle_core::Result<Tensor> {
        let width = y.dim(1)?;
        self.apply_stacked(layer, &[module], x, y, &[width], rows)?
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("lora: no output".into()))
    }

    /// Every occupied slot and its adapter's serial when some row uses an adapter (nothing
    /// otherwise: no LoRA launch): with the uniform mapping the kernels and their factor tables
    /// follow from them, the row table is the graph's input. Only the kernel path records.
    fn graph_key(&self, rows: &RowSlots) -> Option<Vec<u64>> {
        if !rows.has_adapters() {
            return Some(Vec::new());
        }
        if self.backend() != LoraBackend::Kernels {
            return None;
        }
        // Every row's adapter must be there (the step fails otherwise, recorded or not).
        for (slot, _) in rows.groups() {
            self.get(*slot)?;
        }
        Some(
            self.occupied()
                .flat_map(|(slot, a)| [u64::from(slot), a.serial()])
                .collect(),
        )
    }

    /// Each row's place among the occupied slots (the uniform mapping's adapters).
    fn graph_rows(&self, rows: &RowSlots) -> Vec<u32> {
        let occupied: Vec<u32> = self.occupied().map(|(slot, _)| slot).collect();
        rows.slots()
            .iter()
            .map(|slot| {
                occupied
                    .binary_search(slot)
                    .map_or(NO_ADAPTER, |i| i as u32)
            })
            .collect()
    }

    fn apply_stacked(
        &self,
        layer: usize,
        modules: &[TargetModule],
        x: &Tensor,
        y: Tensor,
        widths: &[usize],
        rows: &RowSlots,
    ) -> candle_core::Result<Vec<Tensor>> {
        if !rows.has_adapters() {
            return split_columns(&y, widths);
        }
        // The slots of this step that have any of the modules, ascending, with each module's
        // factors; with the uniform mapping every occupied slot, whether or not it has them.
        let mut used: Vec<(u32, Vec<Option<&DeviceModule>>)> =
            Vec::with_capacity(rows.groups().len());
        for (slot, _) in rows.groups() {
            let adapter = self
                .get(*slot)
                .ok_or_else(|| candle_core::Error::Msg(format!("adapter slot {slot} is empty")))?;
            let found = modules_of(adapter, layer, modules);
            if !rows.uniform() && found.iter().any(Option::is_some) {
                used.push((*slot, found));
            }
        }
        if rows.uniform() {
            used.extend(
                self.occupied()
                    .map(|(slot, a)| (slot, modules_of(a, layer, modules))),
            );
        }
        if used
            .iter()
            .all(|(_, found)| found.iter().all(Option::is_none))
        {
            return split_columns(&y, widths);
        }
        if self.backend() == LoraBackend::Kernels {
            // `used` holds every occupied slot with the uniform mapping, in `graph_rows`' order.
            let mapping = rows
                .uniform()
                .then(|| KernelRows::PerRow(self.graph_rows(rows)));
            let y = apply_kernels(x, y, rows, mapping, &used, widths)?;
            return split_columns(&y, widths);
        }
        // The candle path, module by module over the slots that have it.
        let mut out = Vec::with_capacity(widths.len());
        for (p, part) in split_columns(&y, widths)?.into_iter().enumerate() {
            let used: Vec<(u32, &DeviceModule)> = used
                .iter()
                .filter_map(|(slot, found)| found[p].map(|m| (*slot, m)))
                .collect();
            let Some(first) = used.first() else {
                out.push(part);
                continue;
            };
            let (out_dtype, dtype) = (part.dtype(), first.1.a.dtype());
            let x = x.to_dtype(dtype)?.contiguous()?;
            let part = part.to_dtype(dtype)?.contiguous()?;
            out.push(apply_candle(&x, part, rows, &used)?.to_dtype(out_dtype)?);
        }
        Ok(out)
    }
}

/// Through [`add_lora_parts`], every module of `widths` in one call: on the CPU in f32
/// (half-precision operands are widened and the result rounded once), on a GPU in the
/// activations' own dtype (the kernels accumulate in f32). Returns `y` with the deltas.
/// The rows' mapping is `mapping` when given (the uniform one), else built from the runs of
/// `rows` over the slots of `used`.
fn apply_kernels(
    x: &Tensor,
    y: Tensor,
    rows: &RowSlots,
    mapping: Option<KernelRows>,
    used: &[(u32, Vec<Option<&DeviceModule>>)],
    widths: &[usize],
) -> candle_core::Result<Tensor> {
    let out_dtype = y.dtype();
    let work = if y.device().is_cpu() {
        LORA_DTYPE
    } else {
        out_dtype
    };
    let x = x.to_dtype(work)?.contiguous()?;
    // `y` is the projections' own fresh output, or a column range of one whose other columns
    // belong to other projections: add in place instead of copying it. The GPU kernels write
    // a column range at its row stride; the CPU kernels take contiguous rows. `to_dtype` and
    // `contiguous` return `y` unchanged when there is nothing to do.
    let y = y.to_dtype(work)?;
    let y = if y.device().is_cuda() && RowSpan::of(y.layout()).is_some() {
        y
    } else {
        y.contiguous()?
    };
    let mapping = mapping.unwrap_or_else(|| {
        let adapter_of = |slot: u32| used.binary_search_by_key(&slot, |(s, _)| *s).ok();
        // Sized up front: a decode step makes one segment per row, and this runs for every
        // projection of every layer.
        let runs = rows.runs();
        let mut segments = Vec::with_capacity(runs.len());
        segments.extend(runs.iter().filter_map(|r| {
            adapter_of(r.slot).map(|adapter| Segment {
                start: r.start,
                len: r.len,
                adapter,
            })
        }));
        KernelRows::from_segments(rows.len(), segments)
    });
    let mut entries = Vec::with_capacity(used.len() * widths.len());
    entries.extend(used.iter().flat_map(|(_, found)| {
        found.iter().map(|m| {
            m.map(|m| LoraFactors {
                rank: m.rank,
                a: &m.a,
                b_t: &m.b_t,
            })
        })
    }));
    let factors = PartFactors {
        widths: widths.to_vec(),
        entries,
    };
    add_lora_parts(&x, &y, &mapping, &factors)?;
    y.to_dtype(out_dtype)
}

/// `adapter`'s factors of each of `modules` in `layer`.
fn modules_of<'a>(
    adapter: &'a SlotAdapter,
    layer: usize,
    modules: &[TargetModule],
) -> Vec<Option<&'a DeviceModule>> {
    modules.iter().map(|&m| adapter.module(layer, m)).collect()
}

fn apply_candle(
    x: &Tensor,
    mut y: Tensor,
    rows: &RowSlots,
    used: &[(u32, &DeviceModule)],
) -> candle_core::Result<Tensor> {
    for (slot, idx) in rows.groups() {
        let Ok(i) = used.binary_search_by_key(slot, |(s, _)| *s) else {
            continue;
        };
        let m = used[i].1;
        let first = idx.first().copied().unwrap_or(0) as usize;
        let contiguous = idx
            .iter()
            .enumerate()
            .all(|(k, &r)| r as usize == first + k);
        if contiguous {
            let xg = x.narrow(0, first, idx.len())?;
            let delta = xg.matmul(&m.a.t()?)?.matmul(&m.b_t)?;
            let yg = (y.narrow(0, first, idx.len())? + delta)?;
            y = y.slice_scatter0(&yg, first)?;
        } else {
            let ids = Tensor::from_slice(idx, idx.len(), x.device())?;
            let delta = x.index_select(&ids, 0)?.matmul(&m.a.t()?)?.matmul(&m.b_t)?;
            y = y.index_add(&ids, &delta, 0)?;
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use medley_merge::fixture::{AdapterFixture, LlamaShape};

    use super::*;
    use crate::adapters::base::BaseModules;
    use crate::adapters::base::tests::tiny_config;
    use crate::adapters::weights::SlotWeights;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A store with adapters in slots 1 (q, v, down; rank 4) and 3 (all modules; rank 2).
    fn store(backend: LoraBackend) -> AdapterStore {
        let base = BaseModules::from_config(&tiny_config());
        let shapes = LlamaShape::tiny().module_shapes();
        let mut st = AdapterStore::new(4, 1 << 30, backend);
        let mut one = AdapterFixture::new(4, 21);
        one.targets = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
        for (slot, fx) in [(1, one), (3, AdapterFixture::new(2, 22))] {
            let w = SlotWeights::from_adapter(&fx.adapter(&shapes).expect("fx"), &base)
                .expect("weights");
            st.install(slot, w.to_device(&base, &Device::Cpu).expect("dev"))
                .expect("install");
        }
        st
    }

    /// `y + x Aᵀ (s Bᵀ)` per row, from the stored factors, in f64.
    fn dense(
        st: &AdapterStore,
        module: TargetModule,
        x: &[f32],
        y: &[f32],
        slots: &[u32],
    ) -> Vec<f32> {
        let (inf, outf) = (x.len() / slots.len(), y.len() / slots.len());
        let mut out = y.to_vec();
        for (row, &slot) in slots.iter().enumerate() {
            let Some(m) = st.get(slot).and_then(|a| a.module(1, module)) else {
                continue;
            };
            let a = m.a.to_vec2::<f32>().expect("a");
            let b = m.b_t.to_vec2::<f32>().expect("b");
            for o in 0..outf {
                let mut acc = 0f64;
                for j in 0..m.rank {
                    let t: f64 = (0..inf)
                        .map(|k| x[row * inf + k] as f64 * a[j][k] as f64)
                        .sum();
                    acc += t * b[j][o] as f64;
                }
                out[row * outf + o] = (y[row * outf + o] as f64 + acc) as f32;
            }
        }
        out
    }

    /// `st`'s delta of `module` over rows of `slots` (uniformly mapped when `uniform`), and
    /// the dense formula's.
    fn run(
        st: &AdapterStore,
        module: TargetModule,
        slots: &[u32],
        dtype: DType,
        uniform: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let (out, inp) = BaseModules::from_config(&tiny_config()).shape(module);
        let n = slots.len();
        let (xv, yv) = (values(n * inp, 5), values(n * out, 6));
        let x = Tensor::from_slice(&xv, (n, inp), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("x");
        let y = Tensor::from_slice(&yv, (n, out), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("y");
        let rows = RowSlots::new(slots.to_vec());
        let rows = if uniform { rows.into_uniform() } else { rows };
        let got = st.apply(1, module, &x, y, &rows).expect("apply");
        assert_eq!(got.dtype(), dtype);
        let got = got
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec");
        // The reference sees the same (rounded) inputs.
        let round = |v: &[f32]| -> Vec<f32> {
            Tensor::from_slice(v, v.len(), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .expect("round")
        };
        (got, dense(st, module, &round(&xv), &round(&yv), slots))
    }

    /// The graph key names the adapters loaded, not which row uses which (the uniform
    /// mapping's row table is the graph's input): equal for any rows on them, different when a
    /// slot's adapter is loaded again (new tensors), nothing for the base model alone; the
    /// candle path is not recorded. The row table indexes the loaded slots.
    #[test]
    fn graph_keys_name_the_loaded_adapters() {
        let mut st = store(LoraBackend::Kernels);
        let rows = RowSlots::new(vec![1, 0, 3, 1]);
        let key = st.graph_key(&rows).expect("kernels record");
        assert_eq!(key.len(), 4, "two slots and their serials");
        for other in [vec![3, 0, 1, 1], vec![3, 1], vec![0, 3, 3]] {
            assert_eq!(st.graph_key(&RowSlots::new(other)), Some(key.clone()));
        }
        assert_eq!(st.graph_key(&RowSlots::new(vec![0, 0])), Some(vec![]));
        assert_eq!(st.graph_key(&RowSlots::new(vec![2])), None, "an empty slot");
        let none = NO_ADAPTER;
        assert_eq!(st.graph_rows(&rows), vec![0, none, 1, 0]);
        assert_eq!(st.graph_rows(&RowSlots::new(vec![3, 0])), vec![1, none]);
        // The same adapter loaded again into slot 3: other tensors, another key.
        let again = store(LoraBackend::Kernels);
        let reloaded = again.get(3).expect("slot 3").clone();
        st.install(3, reloaded).expect("install");
        assert_ne!(st.graph_key(&rows), Some(key));
        let candle = store(LoraBackend::Candle);
        assert_eq!(candle.graph_key(&rows), None);
        assert_eq!(candle.graph_key(&RowSlots::new(vec![0, 0])), Some(vec![]));
        assert_eq!(crate::model::NoLora.graph_key(&rows), Some(Vec::new()));
    }

    /// f32: sums of at most 176 products of values below 1 in magnitude, f32 vs f64 accumulation:
    /// well below 1e-5. bf16: one rounding of the result to bf16 (relative 2⁻⁸). The kernel
    /// path also with the uniform mapping, where slot 1 takes part in the calls of the modules
    /// it lacks (no factors: its rows are left alone).
    #[test]
    fn both_backends_match_the_dense_formula() {
        let prefill = [0, 1, 1, 1, 3, 3, 0, 1];
        let decode = [3, 1, 0, 3, 1, 2, 0];
        for backend in [LoraBackend::Kernels, LoraBackend::Candle] {
            let mut st = store(backend);
            // Slot 2 is empty: using it is an error.
            assert!(
                st.apply(
                    1,
                    TargetModule::Q,
                    &Tensor::zeros((7, 64), DType::F32, &Device::Cpu).expect("x"),
                    Tensor::zeros((7, 64), DType::F32, &Device::Cpu).expect("y"),
                    &RowSlots::new(decode.to_vec())
                )
                .is_err()
            );
            let decode = [3, 1, 0, 3, 1, 0, 1];
            let mappings: &[bool] = match backend {
                LoraBackend::Kernels => &[false, true],
                LoraBackend::Candle => &[false],
            };
            for module in TargetModule::ALL {
                for &uniform in mappings {
                    for slots in [&prefill[..], &decode[..]] {
                        let (got, want) = run(&st, module, slots, DType::F32, uniform);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-5,
                                "{backend:?} {module:?} uniform {uniform}: {g} vs {w}"
                            );
                        }
                        let (got, want) = run(&st, module, slots, DType::BF16, uniform);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 2f32.powi(-8) * w.abs() + 1e-6,
                                "{backend:?} bf16 {module:?} uniform {uniform}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
            // Rows of the base model are returned unchanged, bit for bit.
            let (got, want) = run(&st, TargetModule::K, &[0, 0], DType::F32, false);
            assert_eq!(got, want);
            st.set_backend(LoraBackend::Candle);
        }
    }
}
