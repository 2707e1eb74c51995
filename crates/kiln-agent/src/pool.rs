//! Threads kept for execs and file requests: starting a thread is slow in
//! an emulated guest, so finished threads wait for the next job instead of
//! exiting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<Sender<Job>>,
    queue: Arc<Mutex<Receiver<Job>>>,
    idle: Arc<AtomicUsize>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel();
        Pool {
            jobs: Mutex::new(jobs),
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::default(),
        }
    })
}

/// Runs `job` on an idle pooled thread, or on a new one when none is idle,
/// so a long job never holds up another.
pub fn run(job: impl FnOnce() + Send + 'static) {
    let pool = pool();
    let claimed = pool
        .idle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if claimed {
        let _ = pool
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(job));
        return;
    }
    let queue = pool.queue.clone();
    let idle = pool.idle.clone();
    std::thread::spawn(move || {
        let mut job: Job = Box::new(job);
        loop {
            job();
            idle.fetch_add(1, Ordering::SeqCst);
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            match next {
                Ok(next) => job = next,
                Err(_) => return,
            }
        }
    });
}
