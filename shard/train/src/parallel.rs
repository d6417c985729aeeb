//! Independent training jobs at once: one OS thread and one rayon pool per job. The ops of a
//! model as small as the demo's use a second core poorly (one thread trains as fast as two),
//! separate jobs use them all.

use crate::TrainError;

/// One rayon pool per job, each with an equal share of the global pool's threads (at least
/// one): the ops of a model this small use a second core poorly, separate jobs use them all.
pub(crate) fn job_pools(jobs: usize) -> Result<Vec<rayon::ThreadPool>, TrainError> {
    let threads = (rayon::current_num_threads() / jobs.max(1)).max(1);
    (0..jobs)
        .map(|_| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| TrainError::Config(format!("thread pool: {e}")))
        })
        .collect()
}

/// Runs `work` on every item at once, item `i` on its own thread inside `pools[i]`; the
/// results in item order, or the first error.
pub(crate) fn in_parallel<I, T, F>(
    items: Vec<I>,
    pools: &[rayon::ThreadPool],
    work: F,
) -> Result<Vec<T>, TrainError>
where
    I: Send,
    T: Send,
    F: Fn(I) -> Result<T, TrainError> + Sync,
{
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .zip(pools)
            .map(|(item, pool)| scope.spawn(move || pool.install(|| work(item))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().map_err(|_| {
                    TrainError::Config("an adapter's training thread panicked".into())
                })?
            })
            .collect()
    })
}
