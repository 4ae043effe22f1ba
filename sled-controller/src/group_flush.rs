//! Group flush: many writers share one `flush()` of a device.
//!
//! Flushes are numbered 1, 2, … in the order they start. A waiter arriving
//! when `started == s` needs a flush numbered `> s` (one that started after
//! its writes completed). If no flush is running it starts one itself; if one
//! is running it waits, and when that one ends either its result covers the
//! waiter (it started late enough) or some waiter starts the next one. So at
//! most one flush runs at a time, and every waiter is answered by the first
//! successful flush numbered `> s` — or by a failed flush numbered `> s`,
//! which is reported as an error.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    started: u64,
    running: bool,
    last_success: u64,
    last_failure: u64,
    last_error: String,
}

#[derive(Debug, Default)]
pub(crate) struct GroupFlush {
    state: Mutex<State>,
    done: Notify,
}

struct LeadGuard<'a> {
    group: &'a GroupFlush,
    number: u64,
    result: Option<Result<(), String>>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        self.group.finish(self.number, self.result.take());
    }
}

enum Step {
    Done(Result<(), String>),
    Lead(u64),
    Wait,
}

impl GroupFlush {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain counters, consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a flush that started after this call succeeded. `flush`
    /// is called (at most once per call of `wait`) when this waiter leads.
    pub(crate) async fn wait<F, Fut>(&self, flush: F) -> Result<(), String>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let need = self.lock().started + 1;
        // Bounded: each iteration either returns, leads (then returns), or
        // waits for a running flush to end; every flush ends.
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut st = self.lock();
                if st.last_success >= need {
                    Step::Done(Ok(()))
                } else if st.last_failure >= need {
                    Step::Done(Err(st.last_error.clone()))
                } else if !st.running {
                    st.started += 1;
                    st.running = true;
                    Step::Lead(st.started)
                } else {
                    Step::Wait
                }
            };
            match step {
                Step::Done(result) => return result,
                Step::Wait => notified.await,
                Step::Lead(number) => {
                    debug_assert!(number >= need);
                    // If this future is dropped mid-flush, the guard still
                    // clears `running` and wakes the waiters (one of them
                    // then leads a new flush), so nobody waits forever.
                    let mut guard = LeadGuard {
                        group: self,
                        number,
                        result: None,
                    };
                    let result = flush().await;
                    guard.result = Some(result.clone());
                    drop(guard);
                    return result;
                }
            }
        }
    }

    fn finish(&self, number: u64, result: Option<Result<(), String>>) {
        {
            let mut st = self.lock();
            st.running = false;
            match result {
                Some(Ok(())) => st.last_success = st.last_success.max(number),
                Some(Err(e)) => {
                    st.last_failure = st.last_failure.max(number);
                    st.last_error = e;
                }
                // Abandoned: its outcome is unknown, so it covers nobody.
                None => {}
            }
        }
        self.done.notify_waiters();
    }

    /// Flushes started so far (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn started(&self) -> u64 {
        self.lock().started
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_share_flushes_and_each_is_covered() {
        let group = Arc::new(GroupFlush::default());
        let flushes = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let group = group.clone();
            let flushes = flushes.clone();
            tasks.push(tokio::spawn(async move {
                let before = flushes.load(Ordering::SeqCst);
                group
                    .wait(|| {
                        let flushes = flushes.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            flushes.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                    })
                    .await
                    .unwrap();
                // A flush started and completed after we arrived.
                assert!(flushes.load(Ordering::SeqCst) > before);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..64).contains(&n), "flushes {n}");
        assert_eq!(group.started(), n);
    }

    #[tokio::test]
    async fn abandoned_leader_does_not_block_others() {
        let group = Arc::new(GroupFlush::default());
        let leader = {
            let group = group.clone();
            tokio::spawn(
                async move { group.wait(std::future::pending::<Result<(), String>>).await },
            )
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let _ = leader.await;
        tokio::time::timeout(Duration::from_secs(5), group.wait(|| async { Ok(()) }))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn failure_is_reported_to_covered_waiters() {
        let group = GroupFlush::default();
        let r = group.wait(|| async { Err("boom".to_string()) }).await;
        assert_eq!(r, Err("boom".to_string()));
        // A later waiter needs a new flush, which succeeds.
        group.wait(|| async { Ok(()) }).await.unwrap();
    }
}
