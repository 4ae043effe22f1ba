//! A TCP proxy in front of one network path, to model that network failing.
//!
//! Modes: `Forward` (a working path), `Refuse` (the listener is closed:
//! connections are refused, as when a switch port is down and the host
//! answers RST), `Blackhole` (connections are accepted and bytes swallowed,
//! nothing ever answers: a switch dropping packets). Switching to a failing
//! mode also cuts the connections already open.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Forward,
    Refuse,
    Blackhole,
}

#[derive(Debug)]
pub struct FaultProxy {
    pub listen: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    target: SocketAddr,
}

impl FaultProxy {
    /// Listens on `listen` and forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Arc<FaultProxy> {
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let proxy = Arc::new(FaultProxy {
            listen,
            mode,
            task: Mutex::new(None),
            target,
        });
        proxy.bind().await;
        proxy
    }

    async fn bind(self: &Arc<Self>) {
        let listener = TcpListener::bind(self.listen).await.unwrap();
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = me.mode.subscribe();
                let target = me.target;
                tokio::spawn(async move {
                    let mode = *rx.borrow_and_update();
                    match mode {
                        ProxyMode::Forward => {
                            let Ok(server) = TcpStream::connect(target).await else {
                                return;
                            };
                            let (mut cr, mut cw) = client.into_split();
                            let (mut sr, mut sw) = server.into_split();
                            tokio::select! {
                                _ = tokio::io::copy(&mut cr, &mut sw) => {}
                                _ = tokio::io::copy(&mut sr, &mut cw) => {}
                                _ = rx.changed() => {
                                    // A blackholed path keeps its open connections
                                    // but nothing crosses them any more.
                                    if *rx.borrow_and_update() == ProxyMode::Blackhole {
                                        drop((sr, sw));
                                        if let Ok(client) = cr.reunite(cw) {
                                            swallow(client, rx).await;
                                        }
                                    }
                                }
                            }
                        }
                        ProxyMode::Blackhole => swallow(client, rx).await,
                        ProxyMode::Refuse => {}
                    }
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    pub async fn set_mode(self: &Arc<Self>, mode: ProxyMode) {
        let previous = *self.mode.borrow();
        if previous == ProxyMode::Refuse && mode != ProxyMode::Refuse {
            self.bind().await;
        }
        if mode == ProxyMode::Refuse {
            let task = self.task.lock().unwrap().take();
            if let Some(task) = task {
                task.abort();
                let _ = task.await;
            }
        }
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn swallow(mut client: TcpStream, mut rx: watch::Receiver<ProxyMode>) {
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = client.read(&mut sink) => match read { Ok(0) | Err(_) => return, Ok(_) => {} },
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}
