//! [`on_wake`]: a future that is polled only after it asked to be, and
//! [`WakeGate`], the same for one half of a poll function.
//!
//! An executor's `run(main)` polls `main` on every wake-up of the thread
//! (async-executor's `run` is `main.or(run_tasks)`), and so does any
//! `future::or`. When `main` awaits a signal stream, each of those polls is
//! a `recv` on the signal pipe that fails with `EAGAIN`: one wasted system
//! call per wake-up of the whole program. Wrapped in [`on_wake`], the inner
//! future is polled once at first and then only after its own waker fired,
//! so the wake-ups of other tasks cost nothing here.
//!
//! The two directions of a copy are the same story inside one task: a
//! `try_zip` or a poll function that polls both on every wake-up makes the
//! idle direction try its socket each time the busy one is woken, a `recv`
//! that fails with `EAGAIN` and an `epoll_ctl` to re-arm it. With a
//! [`WakeGate`] per direction, each runs only when its own waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// `f`, polled only when its own waker has fired since its last poll (and
/// once at the start). See the module docs.
pub fn on_wake<F: Future>(f: F) -> OnWake<F> {
    OnWake {
        f: Box::pin(f),
        gate: WakeGate::new(),
    }
}

/// The future [`on_wake`] returns.
pub struct OnWake<F> {
    f: Pin<Box<F>>,
    gate: WakeGate,
}

/// Runs a poll function only when the waker it was last given has fired
/// (and the first time). See the module docs.
pub struct WakeGate {
    flag: Arc<Flag>,
}

impl Default for WakeGate {
    fn default() -> WakeGate {
        WakeGate::new()
    }
}

impl WakeGate {
    /// A gate that lets the first call through.
    pub fn new() -> WakeGate {
        WakeGate {
            flag: Arc::new(Flag {
                woken: AtomicBool::new(true),
                outer: Mutex::new(None),
            }),
        }
    }

    /// `f` with a context whose waker is this gate's, if that waker fired
    /// since `f` last ran (or `f` never ran); otherwise `Pending` without
    /// running `f`. Either way `cx`'s waker is woken when the gate's is.
    /// Once `f` is `Ready`, keep its result: the gate does not remember it.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            // Register first, then look at the flag: a wake in between
            // sets the flag and finds this waker.
            let mut outer = self.flag.outer.lock().unwrap_or_else(|e| e.into_inner());
            match outer.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *outer = Some(cx.waker().clone()),
            }
        }
        if !self.flag.woken.swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        let inner_waker = Waker::from(self.flag.clone());
        let mut inner_cx = Context::from_waker(&inner_waker);
        f(&mut inner_cx)
    }
}

struct Flag {
    /// The inner future's waker fired since it was last polled.
    woken: AtomicBool,
    /// Who polls the [`OnWake`]: woken when the inner future's waker fires.
    outer: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let outer = self.outer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = outer {
            w.wake();
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // `f` is boxed, so `OnWake` is `Unpin` whatever `F` is.
        let this = self.get_mut();
        let f = &mut this.f;
        this.gate.poll(cx, |inner| f.as_mut().poll(inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready on the third, and wakes itself on each.
    struct Counted(Arc<AtomicUsize>);

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 2 {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts its polls and never wakes itself: a signal stream with no signal.
    struct Quiet(Arc<AtomicUsize>);

    impl Future for Quiet {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Pending
        }
    }

    #[test]
    fn the_inner_future_is_polled_only_after_its_own_wake() {
        let outer = Waker::from(Arc::new(Flag {
            woken: AtomicBool::new(false),
            outer: Mutex::new(None),
        }));
        let mut cx = Context::from_waker(&outer);
        // Ten wake-ups of the program reach a quiet inner future once.
        let quiet_polls = Arc::new(AtomicUsize::new(0));
        let mut quiet = on_wake(Quiet(quiet_polls.clone()));
        for _ in 0..10 {
            assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        }
        assert_eq!(quiet_polls.load(Ordering::SeqCst), 1);
        // One that wakes itself is polled each time and finishes on its third.
        let counted = Arc::new(AtomicUsize::new(0));
        let mut lively = on_wake(Counted(counted.clone()));
        assert!(Pin::new(&mut lively).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut lively).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut lively).poll(&mut cx).is_ready());
        assert_eq!(counted.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_wake_from_elsewhere_reaches_the_outer_waker_and_the_next_poll() {
        futures_lite::future::block_on(async {
            let (tx, rx) = async_channel_like();
            let waiter = on_wake(rx);
            let t = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                tx();
            });
            waiter.await;
            t.join().expect("thread");
        });
    }

    /// A one-shot: the closure fires it from another thread.
    fn async_channel_like() -> (impl FnOnce() + Send, impl Future<Output = ()>) {
        let state = Arc::new((AtomicBool::new(false), Mutex::new(None::<Waker>)));
        let s2 = state.clone();
        let fire = move || {
            s2.0.store(true, Ordering::SeqCst);
            if let Some(w) = s2.1.lock().expect("lock").take() {
                w.wake();
            }
        };
        let wait = std::future::poll_fn(move |cx| {
            *state.1.lock().expect("lock") = Some(cx.waker().clone());
            if state.0.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        (fire, wait)
    }
}
