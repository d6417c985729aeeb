//! The CUDA side of [`super::lora_op::add_lora_parts`]: launches `medley_kernels::cuda`'s
//! SGMV/BGMV shrink and expand kernels (looked up once per device) on candle's stream of `y`'s
//! device: one launch pair (one launch through the fused BGMV kernel) for every projection side
//! by side in `y`, and another for each further [`MAX_RANK`](medley_kernels::cuda::MAX_RANK) of
//! the largest rank (a `cat` merge's rank is the sum of its adapters'): each pass takes a slice
//! of every factor pair's rank ([`RankSlice`]), and their products add up in `y`.
//!
//! A call reads two small device tables: the factors' (the A and Bᵀ pointers and the ranks of
//! every (adapter, part), and the parts' end columns) and the row mapping. Both come from
//! content-keyed caches ([`super::upload_cache`]): a projection's factor table is uploaded when
//! its batch's adapter set first appears and reused by every later step, and a step's row
//! mapping is uploaded by its first projection and reused by the rest (and by later steps over
//! the same rows). The `[rows, largest total rank]` f32 intermediate (uninitialised: the shrink
//! writes what the expand reads) and the fused kernel's counters are a per-device workspace
//! that every call reuses, so a call allocates nothing on the device; the factors themselves are
//! read in place. The workspace grows by stream-ordered reallocation, so nothing is freed under
//! a running kernel.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{
    CudaDevice, CudaStorage, DType, Device, InplaceOp2, Layout, Storage, StorageRef, Tensor,
    TensorId,
};
use medley_kernels::cuda::{
    FUSED_BGMV_MAX_ROWS, FUSED_BGMV_SYNC_WORDS, GROUPED_MAX_ROWS, LORA_PTX, RankSlice,
    expand_launch, fused_bgmv_kernel_name, fused_bgmv_launch, fused_grouped_kernel_name,
    fused_grouped_launch, grouped_expand_launch, grouped_kernel_names, grouped_shrink_launch,
    grouped_splits, kernel_names, rank_passes, segment_triples, shrink_launch,
};

use super::lora_op::{BgmvKernels, FUSED_SEGMENT_ROWS, KernelRows, LoraFactors, PartFactors};
use super::upload_cache::{UploadCache, pack_words};
use crate::model::cuda_launch::kernel;
use crate::model::row_span::RowSpan;

/// The name the PTX module is cached under in candle's device.
const MODULE: &str = "medley_lora";

/// A device table and the cache of them.
type Table = Arc<CudaSlice<u64>>;
type Tables = Mutex<UploadCache<(DeviceId, Vec<u64>), Table>>;

/// A factor table's key: per (adapter, part) entry the ids of its A and Bᵀ tensors and its rank
/// (`None` without factors), then the parts' widths and the rank pass ([`RankSlice`]). Candle
/// never reuses a tensor id within a process and a tensor's storage never moves, so the key
/// names one table's content: a hit costs no storage lock and no pointer lookup, which a call
/// with 8 adapters and 3 parts would otherwise take 48 of. An adapter evicted and another loaded
/// in its place has new tensors, hence new ids.
type FactorKey = (
    DeviceId,
    Vec<Option<(TensorId, TensorId, usize)>>,
    Vec<usize>,
    usize,
);

/// Factor tables: one per (layer, projection, adapter set) in use; 7 projections × 80 layers of
/// a 70B model fit about 7 adapter sets.
static FACTOR_TABLES: LazyLock<Mutex<UploadCache<FactorKey, Table>>> =
    LazyLock::new(|| Mutex::new(UploadCache::new(4096)));

/// Row mappings: one per step, shared by its projections.
static ROW_TABLES: LazyLock<Tables> = LazyLock::new(|| Mutex::new(UploadCache::new(64)));

/// A device's LoRA workspace, shared by every call on its stream: the f32 intermediate between
/// shrink and expand (grown to the largest a call has needed), and the fused kernel's counters
/// (zeroed when allocated, and left zero by every launch). A call holds it from its first launch
/// to its last; launches on one stream run in turn, so the next call's kernels start after this
/// call's are done with it. Each candle device has its own stream, hence a workspace per device.
///
/// A CUDA graph records the buffers' addresses: an intermediate outgrown after one was recorded
/// is kept (`recorded`) rather than freed, since the graph still writes it. Each growth doubles,
/// so those kept add up to less than the largest.
#[derive(Default)]
struct Scratch {
    t: Option<CudaSlice<f32>>,
    sync: Option<CudaSlice<u32>>,
    /// Whether a graph recorded `t`.
    in_graph: bool,
    /// Intermediates outgrown after a graph recorded them.
    recorded: Vec<CudaSlice<f32>>,
}

impl Scratch {
    /// The intermediate, at least `len` values (uninitialised), and with `sync`, the counters.
    fn buffers(
        &mut self,
        dev: &CudaDevice,
        len: usize,
        sync: bool,
    ) -> candle_core::Result<(&mut CudaSlice<f32>, Option<&CudaSlice<u32>>)> {
        let recording = crate::model::graphs::recording();
        if self.t.as_ref().is_none_or(|t| t.len() < len) {
            if recording {
                // Memory allocated in a graph is the graph's: the eager step before a
                // recording grows the workspace instead.
                candle_core::bail!("lora op: the workspace would grow inside a CUDA graph");
            }
            let grown = len.max(2 * self.t.as_ref().map_or(0, |t| t.len()));
            // SAFETY: every call's shrink writes the entries its expand reads (see lora.cu);
            // the old buffer is freed in stream order, after the kernels that used it.
            let old = self.t.replace(unsafe { dev.alloc::<f32>(grown) }?);
            if let Some(old) = old.filter(|_| std::mem::take(&mut self.in_graph)) {
                self.recorded.push(old);
            }
        }
        if recording {
            self.in_graph = true;
        }
        if sync && self.sync.is_none() {
            if recording {
                candle_core::bail!("lora op: the counters would be allocated inside a CUDA graph");
            }
            self.sync = Some(dev.alloc_zeros::<u32>(FUSED_BGMV_SYNC_WORDS + FUSED_BGMV_MAX_ROWS)?);
        }
        match &mut self.t {
            Some(t) => Ok((t, self.sync.as_ref().filter(|_| sync))),
            None => candle_core::bail!("lora op: no intermediate buffer"),
        }
    }
}

/// The workspaces, by device.
static SCRATCH: LazyLock<Mutex<HashMap<DeviceId, Arc<Mutex<Scratch>>>>> =
    LazyLock::new(Default::default);

/// `dev`'s workspace.
fn scratch(dev: &CudaDevice) -> Arc<Mutex<Scratch>> {
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    let mut map = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(dev.id()).or_default().clone()
}

/// Tables uploaded so far: `(factor tables, row tables)`.
pub(super) fn table_uploads() -> (u64, u64) {
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    let factors = FACTOR_TABLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .uploads();
    let rows = ROW_TABLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .uploads();
    (factors, rows)
}

/// The device copy of `table` (packed words) on `dev`, from `cache` or uploaded.
fn device_table(cache: &Tables, dev: &CudaDevice, table: Vec<u64>) -> candle_core::Result<Table> {
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let table = cache.get_or_upload((dev.id(), table), |(_, t)| {
        dev.clone_htod(t.as_slice()).map(Arc::new)
    })?;
    kept_by_graph(&table);
    Ok(table)
}

/// Keeps `table` alive with the CUDA graph being recorded, if one is (its cache may evict it).
fn kept_by_graph(table: &Table) {
    crate::model::graphs::keep(|| table.clone());
}

pub(super) fn add_lora(
    x: &Tensor,
    y: &Tensor,
    rows: &KernelRows,
    factors: &PartFactors<'_>,
) -> candle_core::Result<()> {
    let Device::Cuda(dev) = y.device() else {
        candle_core::bail!("lora kernels: y is not on a CUDA device");
    };
    if x.dtype() != y.dtype() || !matches!(y.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "lora kernels: x {:?} and y {:?} must share one of f32, bf16, f16",
            x.dtype(),
            y.dtype()
        );
    }
    let parts = factors.widths.len();
    // Ranks above MAX_RANK (a `cat` merge, a large PEFT rank) go through several passes, each
    // over a slice of every entry's rank: their products add up in y.
    let passes = rank_passes(factors.entries.iter().map(|f| f.map_or(0, |f| f.rank)));
    let n = factors.adapters();
    let y_rows = y.dims2()?.0;
    rows.check(y_rows, n)?;
    let kernels = BgmvKernels::current();
    // The fused kernels take a short segment mapping (a decode step whose neighbours share an
    // adapter) one row at a time.
    let per_row_segments = (kernels.is_fused()
        && matches!(rows, KernelRows::Segments(_))
        && y_rows <= FUSED_SEGMENT_ROWS)
        .then(|| rows.per_row(y_rows));
    let rows = per_row_segments.as_ref().unwrap_or(rows);
    let (per_row, map) = match rows {
        KernelRows::PerRow(t) => (true, t.clone()),
        KernelRows::Segments(s) => (false, segment_triples(s)),
    };
    let units = if per_row { map.len() } else { map.len() / 3 };
    if units == 0 {
        return Ok(());
    }
    let longest = match rows {
        KernelRows::PerRow(_) => 1,
        KernelRows::Segments(s) => s.iter().map(|s| s.len).max().unwrap_or(1),
    };
    let words = map.len();
    // Segments, and more rows (or adapters) than a kernel set takes, go through the per-row
    // (SGMV) launch pairs.
    let fits = match kernels {
        BgmvKernels::PerRow => true,
        BgmvKernels::Grouped => units <= GROUPED_MAX_ROWS,
        BgmvKernels::Fused => units <= FUSED_BGMV_MAX_ROWS,
        BgmvKernels::FusedGrouped => units.max(n) <= FUSED_BGMV_MAX_ROWS,
    };
    let kernels = if per_row && fits {
        kernels
    } else {
        BgmvKernels::PerRow
    };
    // A step recorded into a CUDA graph reads the graph's own row table, which each replay
    // rewrites: the step's uniform mapping, one adapter index per row.
    let rows = if crate::model::graphs::recording() {
        match crate::model::graphs::recorded_rows(&map).filter(|_| per_row) {
            Some(table) => table,
            None => {
                candle_core::bail!("lora op: a recorded step's rows are not the graph's row table")
            }
        }
    } else {
        device_table(&ROW_TABLES, dev, pack_words(map))?
    };
    for pass in 0..passes {
        let slice = |f: &Option<LoraFactors<'_>>| f.map_or(0, |f| RankSlice::of(f.rank, pass).rank);
        // The intermediate's row: an adapter's ranks over its parts, concatenated.
        let max_rank = factors
            .entries
            .chunks(parts)
            .map(|e| e.iter().map(slice).sum::<usize>())
            .max()
            .unwrap_or(1)
            .max(1);
        let op = CudaLoraOp {
            kernels,
            factors: factor_table(dev, factors, pass)?,
            rows: rows.clone(),
            words,
            adapters: n,
            parts: parts as u32,
            per_row,
            units: units as u32,
            longest: longest as u32,
            max_rank: max_rank as u32,
        };
        y.inplace_op2(x, &op)?;
    }
    Ok(())
}

/// The device copy of `factors`' table for rank pass `pass` on `dev` (see [`pointer_table`]),
/// from the cache by the tensors' ids ([`FactorKey`]) or built and uploaded.
fn factor_table(
    dev: &CudaDevice,
    factors: &PartFactors<'_>,
    pass: usize,
) -> candle_core::Result<Table> {
    let entries = factors.entries.iter();
    let key: FactorKey = (
        dev.id(),
        entries
            .map(|f| f.map(|f| (f.a.id(), f.b_t.id(), f.rank)))
            .collect(),
        factors.widths.clone(),
        pass,
    );
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    let mut cache = FACTOR_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let table = cache.get_or_upload(key, |_| {
        let table = pointer_table(dev, factors, pass)?;
        dev.clone_htod(table.as_slice()).map(Arc::new)
    })?;
    kept_by_graph(&table);
    Ok(table)
}

/// A factor table's content for rank pass `pass` ([`RankSlice`]): the A pointers, the Bᵀ
/// pointers (one per (adapter, part) entry, at the first row of the pass's slice; 0 where there
/// are none or the slice is empty), then the slices' ranks and the parts' end columns packed two
/// u32 words to a u64.
fn pointer_table(
    dev: &CudaDevice,
    factors: &PartFactors<'_>,
    pass: usize,
) -> candle_core::Result<Vec<u64>> {
    let stream = dev.cuda_stream();
    let sliced: Vec<Option<(LoraFactors<'_>, RankSlice)>> = factors
        .entries
        .iter()
        .map(|f| {
            f.map(|f| (f, RankSlice::of(f.rank, pass)))
                .filter(|(_, s)| s.rank > 0)
        })
        .collect();
    // The guards hold the storages while their pointers are read. The tensors outlive the
    // call (the adapter store holds them) and are never written again; their memory is freed
    // in stream order after the kernels that read it.
    let guards: Vec<Option<[(StorageRef<'_>, &Layout); 2]>> = sliced
        .iter()
        .map(|e| e.map(|(f, _)| [f.a.storage_and_layout(), f.b_t.storage_and_layout()]))
        .collect();
    let mut a_ptrs = Vec::with_capacity(guards.len());
    let mut b_ptrs = Vec::with_capacity(guards.len());
    let mut syncs = Vec::with_capacity(2 * guards.len());
    for (pair, entry) in guards.iter().zip(&sliced) {
        let (Some(pair), Some((f, slice))) = (pair, entry) else {
            a_ptrs.push(0);
            b_ptrs.push(0);
            continue;
        };
        for (k, ((storage, layout), tensor)) in pair.iter().zip([f.a, f.b_t]).enumerate() {
            let Storage::Cuda(cs) = &**storage else {
                candle_core::bail!("lora kernels: a factor is not on the GPU");
            };
            let Some((start, _)) = layout.contiguous_offsets() else {
                candle_core::bail!("lora kernels: a factor is not contiguous");
            };
            // The slice's first row of the `[rank, columns]` factor.
            let (rank, columns) = tensor.dims2()?;
            if slice.first + slice.rank > rank {
                candle_core::bail!("lora kernels: a rank {rank} factor, slice {slice:?}");
            }
            let (ptr, sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
            syncs.push(sync);
            let offset = start + slice.first * columns;
            let ptr = ptr + (offset * std::mem::size_of::<f32>()) as u64;
            if k == 0 { &mut a_ptrs } else { &mut b_ptrs }.push(ptr);
        }
    }
    let col_ends = factors.widths.iter().scan(0u32, |end, &w| {
        *end += w as u32;
        Some(*end)
    });
    let ranks = sliced.iter().map(|e| e.map_or(0, |(_, s)| s.rank as u32));
    let words = pack_words(ranks.chain(col_ends));
    drop(syncs);
    Ok(a_ptrs.into_iter().chain(b_ptrs).chain(words).collect())
}

/// One `y += LoRA(x)` call on the GPU: the device tables and the launch sizes.
struct CudaLoraOp {
    /// The kernels of decode rows (per-row for segments).
    kernels: BgmvKernels,
    /// `adapters × parts` A pointers, as many Bᵀ pointers, then their ranks and the `parts`
    /// end columns as u32 words (little-endian, two to a u64).
    factors: Table,
    /// The row table (one u32 per row) or the segment triples, packed the same way.
    rows: Table,
    /// u32 words in `rows`.
    words: usize,
    adapters: usize,
    /// Projections side by side in y.
    parts: u32,
    per_row: bool,
    /// Rows (BGMV) or segments (SGMV).
    units: u32,
    /// Rows of the longest segment (1 for BGMV).
    longest: u32,
    max_rank: u32,
}

impl CudaLoraOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        ys: &mut CudaStorage,
        yl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
        suffix: &str,
    ) -> candle_core::Result<()> {
        let (rows, out_features) = yl.shape().dims2()?;
        let (x_rows, in_features) = xl.shape().dims2()?;
        if x_rows != rows || (self.per_row && self.units as usize != rows) {
            candle_core::bail!(
                "lora op: x has {x_rows} rows, y {rows}, the table {}",
                self.units
            );
        }
        // y may be a column range of a wider output (its rows `y_span.stride` apart): the
        // expand kernels write only its columns.
        let (Some((x0, x1)), Some(y_span)) = (xl.contiguous_offsets(), RowSpan::of(yl)) else {
            candle_core::bail!("lora op: x must be contiguous and y rows of contiguous columns");
        };
        if self.units == 0 || rows == 0 || out_features == 0 || in_features == 0 {
            return Ok(());
        }
        let dev = ys.device.clone();
        let (n, parts) = (self.adapters, self.parts);
        let entries = n * parts as usize;
        let a: CudaView<'_, u64> = self.factors.slice(0..entries);
        let b: CudaView<'_, u64> = self.factors.slice(entries..2 * entries);
        // SAFETY (all three): the tails hold `entries + parts` and `words` u32 words
        // (little-endian x86-64 and GPU), in bounds.
        let Some(words) = (unsafe {
            self.factors
                .slice(2 * entries..)
                .transmute::<u32>(entries + parts as usize)
        }) else {
            candle_core::bail!("lora op: the factor table is short");
        };
        let ranks = words.slice(0..entries);
        let col_ends = words.slice(entries..);
        let Some(map) = (unsafe { self.rows.slice(0..).transmute::<u32>(self.words) }) else {
            candle_core::bail!("lora op: the row table is short");
        };
        let x = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let y_all = ys.as_cuda_slice_mut::<T>()?;
        let mut y = y_all.slice_mut(y_span.start..y_span.end);
        let y_stride = y_span.stride as u32;
        let t_stride = self.max_rank;
        let (in_f, out_f) = (in_features as u32, out_features as u32);
        let stream = dev.cuda_stream();
        let scratch = scratch(&dev);
        // A poisoned lock only means another thread panicked between launches: the buffers
        // hold nothing that outlives a call.
        let mut scratch = scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (rows_u, n_u) = (rows as u32, n as u32);
        if self.kernels.is_fused() {
            // Shrink and expand in one launch (see lora.cu): every entry of t an expand block
            // reads is written by the launch's shrink blocks before their row's (adapter's)
            // counter lets it read.
            let grouped = self.kernels == BgmvKernels::FusedGrouped;
            let (splits, split_len) = if grouped {
                grouped_splits(n_u, self.max_rank, in_f)
            } else {
                (1, 0)
            };
            let t_len = splits as usize * rows * t_stride as usize;
            let (t, sync) = scratch.buffers(&dev, t_len, true)?;
            let Some(sync) = sync else {
                candle_core::bail!("lora op: no counters for the fused kernels");
            };
            // The kernel updates the counters through this view (device memory: no host
            // reference aliases it): one per row, or per adapter (both at most
            // FUSED_BGMV_MAX_ROWS: checked when the kernels were chosen).
            let counters = if grouped { rows.max(n) } else { rows };
            let sync = sync.slice(0..FUSED_BGMV_SYNC_WORDS + counters);
            let (name, cfg) = if grouped {
                (
                    fused_grouped_kernel_name(suffix),
                    fused_grouped_launch(n_u, self.max_rank, splits, out_f, rows_u),
                )
            } else {
                let (grid, block) = fused_bgmv_launch(rows_u, self.max_rank, out_f);
                (fused_bgmv_kernel_name(suffix), (grid, block, 0))
            };
            let func = kernel(&dev, MODULE, LORA_PTX, name)?;
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&map).arg(&a).arg(&b).arg(&ranks);
            launch
                .arg(&parts)
                .arg(&col_ends)
                .arg(t)
                .arg(&mut y)
                .arg(&in_f);
            launch
                .arg(&out_f)
                .arg(&t_stride)
                .arg(&y_stride)
                .arg(&rows_u);
            if grouped {
                launch
                    .arg(&n_u)
                    .arg(&self.max_rank)
                    .arg(&splits)
                    .arg(&split_len);
            } else {
                launch.arg(&self.max_rank);
            }
            launch.arg(&sync);
            // SAFETY: the arguments match medley_bgmv_fused(_grouped)'s signature in lora.cu;
            // the operands are as for the launch pairs below, t has at least splits × rows ×
            // t_stride elements, and sync FUSED_BGMV_SYNC_WORDS + max(rows, adapters) zeroed
            // counters (zero since allocation: every launch on this stream leaves them zero);
            // the grouped kernel's shared memory holds `rows` u32.
            unsafe { launch.launch(config(cfg)) }.w()?;
            return Ok(());
        }
        // The kernels and their launch shapes. The grouped ones split the input (the
        // intermediate holds one partial product per split) and take two more arguments each:
        // the rows, and the split length (shrink) or count (expand).
        let (shrink, expand, shrink_cfg, expand_cfg, grouped) =
            if self.kernels == BgmvKernels::Grouped {
                let (splits, split_len) = grouped_splits(n_u, self.max_rank, in_f);
                let [shrink, expand] = grouped_kernel_names(suffix);
                (
                    shrink,
                    expand,
                    grouped_shrink_launch(n_u, self.max_rank, splits, rows_u),
                    grouped_expand_launch(n_u, out_f, rows_u),
                    Some((splits, split_len)),
                )
            } else {
                let names = kernel_names(suffix);
                let (shrink, expand) = if self.per_row {
                    (names[0], names[2])
                } else {
                    (names[1], names[3])
                };
                let (sg, sb) = shrink_launch(self.units, self.max_rank, self.longest);
                let (eg, eb) = expand_launch(self.units, out_f, self.longest);
                (shrink, expand, (sg, sb, 0), (eg, eb, 0), None)
            };
        let splits = grouped.map_or(1, |(splits, _)| splits);
        // The shrink writes t[split, row, j] for every split, mapped row and j below its
        // adapter's total rank before the expand reads exactly those entries.
        let (t, _) = scratch.buffers(&dev, splits as usize * rows * t_stride as usize, false)?;

        let func = kernel(&dev, MODULE, LORA_PTX, shrink)?;
        let mut launch = stream.launch_builder(&func);
        launch.arg(&x).arg(&map).arg(&a).arg(&ranks).arg(&parts);
        launch.arg(&mut *t).arg(&in_f).arg(&t_stride);
        if let Some((_, split_len)) = &grouped {
            launch.arg(&rows_u).arg(split_len);
        }
        // SAFETY: the arguments match the kernel's signature in kernels/cuda/lora.cu; x has
        // rows × in elements, t splits × rows × t_stride, the tables n × parts entries (null
        // factors only where the rank is 0) and one entry per row (or three per segment) whose
        // indices are below n and rows (checked by the caller's mapping); every adapter's total
        // rank is at most t_stride, every part's at most MAX_RANK; the grouped kernels' shared
        // memory holds `rows` u32 (rows ≤ GROUPED_MAX_ROWS).
        unsafe { launch.launch(config(shrink_cfg)) }.w()?;

        let func = kernel(&dev, MODULE, LORA_PTX, expand)?;
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&*t)
            .arg(&map)
            .arg(&b)
            .arg(&ranks)
            .arg(&parts)
            .arg(&col_ends);
        launch.arg(&mut y).arg(&out_f).arg(&t_stride).arg(&y_stride);
        if let Some((splits, _)) = &grouped {
            launch.arg(&rows_u).arg(splits);
        }
        // SAFETY: as above; y has rows rows of out elements, y_stride apart; col_ends has
        // `parts` ascending ends, the last out.
        unsafe { launch.launch(config(expand_cfg)) }.w()?;
        Ok(())
    }
}

/// A launch configuration from `(grid, block, shared bytes)`.
fn config(
    (grid_dim, block_dim, shared_mem_bytes): ((u32, u32, u32), (u32, u32, u32), u32),
) -> LaunchConfig {
    LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes,
    }
}

impl InplaceOp2 for CudaLoraOp {
    fn name(&self) -> &'static str {
        "medley-lora-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("medley-lora-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        ys: &mut CudaStorage,
        yl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<()> {
        match ys.dtype() {
            DType::F32 => self.run::<f32>(ys, yl, xs, xl, "f32"),
            DType::BF16 => self.run::<half::bf16>(ys, yl, xs, xl, "bf16"),
            DType::F16 => self.run::<half::f16>(ys, yl, xs, xl, "f16"),
            other => candle_core::bail!("lora kernels: no kernel for {other:?}"),
        }
    }
}
