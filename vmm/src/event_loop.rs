//! The device event loop: one thread, built on `event-manager`, that runs all device I/O. vCPU
//! threads never do device work: a guest queue notification is an ioeventfd write that wakes
//! this thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use devices::bus::lock;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::BACKEND_EVENT_BASE;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Hands each queue notification of one virtio device to its transport.
struct QueueNotifications {
    transport: Arc<Mutex<MmioTransport>>,
    events: Vec<EventFd>,
}

impl MutEventSubscriber for QueueNotifications {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                log::error!("cannot watch queue {index} of a virtio device: {e:?}");
            }
        }
        lock(&self.transport).init_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() >= BACKEND_EVENT_BASE {
            lock(&self.transport).process_backend(events, ops);
            return;
        }
        let index = events.data() as usize;
        let Some(evt) = self.events.get(index) else {
            return;
        };
        // Drain the counter first so that a notification arriving while we process the queue
        // wakes us again.
        let _ = evt.read();
        lock(&self.transport).process_queue(index);
    }
}

/// Ends the loop when written.
struct Stop {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the event loop's stop event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }
}

/// The running event loop thread.
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Until [`EventLoop::wait_ready`]: tells whether the thread restricted itself.
    ready: Option<std::sync::mpsc::Receiver<Result<(), String>>>,
}

impl EventLoop {
    /// Start the loop serving `transports`. The thread installs its seccomp filter before it
    /// serves anything; [`EventLoop::wait_ready`] tells whether it could, so that the caller can
    /// do other work (start the vCPUs) meanwhile: a queue notification that comes first waits
    /// in its eventfd.
    pub fn start(transports: &[Arc<Mutex<MmioTransport>>]) -> std::io::Result<EventLoop> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for transport in transports {
            let events = lock(transport)
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            manager.add_subscriber(Box::new(QueueNotifications {
                transport: transport.clone(),
                events,
            }));
        }
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(Stop {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || {
                let installed = crate::seccomp::Filter::event_loop().install();
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed.map_err(|e| e.to_string()));
                if !ok {
                    return;
                }
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("the device event loop failed: {e:?}");
                        return;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
            ready: Some(ready_rx),
        })
    }

    /// Wait until the thread has installed its seccomp filter (at once after the first call);
    /// an error when it could not, and the thread has then ended.
    pub fn wait_ready(&mut self) -> std::io::Result<()> {
        let Some(ready_rx) = self.ready.take() else {
            return Ok(());
        };
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the event loop thread died".to_string()));
        if let Err(e) = ready {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            return Err(std::io::Error::other(e));
        }
        Ok(())
    }

    /// Stop the loop and wait for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}
