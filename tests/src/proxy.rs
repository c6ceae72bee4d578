//! `Link`: a TCP proxy on loopback that a test puts between a task manager and the job
//! manager's control address, to stall and then cut one direction of a live connection.
//!
//! `hold` stops forwarding what the client sends (it stays unread in the proxy's socket,
//! as on a congested link) while the other direction flows on; `cut` closes both sides
//! and drops whatever was held — what a machine that crashes or drops off the network
//! takes with it, which a process kill alone does not (the kernel still sends what the
//! process had written). A read in progress when `hold` is called may still forward what it
//! gets (within one poll, 10 ms). Every pump reads with a short timeout and looks at the
//! flags between reads, and a pump that ends shuts both its sockets down, which wakes its
//! partner even from a blocked write; so all of them end once the link is cut or dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// How often a blocked pump looks at the link's flags.
const POLL: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Flags {
    /// Client -> server bytes are not forwarded.
    hold: AtomicBool,
    /// Every connection is closed; nothing more is forwarded or accepted.
    cut: AtomicBool,
}

/// A running proxy to one server address.
pub struct Link {
    /// Where clients connect instead of the server.
    pub addr: String,
    flags: Arc<Flags>,
}

impl Link {
    /// Listens on a free loopback port and forwards every connection to `server`.
    pub fn start(server: &str) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let flags = Arc::new(Flags::default());
        let server: SocketAddr = server.parse().expect("server address");
        let f = flags.clone();
        thread::spawn(move || {
            while !f.cut.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => connect(client, server, &f),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(_) => return,
                }
            }
        });
        Link { addr, flags }
    }

    /// Stops forwarding what clients send; what the server sends still flows.
    pub fn hold(&self) {
        self.flags.hold.store(true, Ordering::SeqCst);
    }

    /// Closes every connection at once, dropping what was held.
    pub fn cut(&self) {
        self.flags.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Connects `client` to `server` and starts a pump each way.
fn connect(client: TcpStream, server: SocketAddr, flags: &Arc<Flags>) {
    let Ok(upstream) = TcpStream::connect_timeout(&server, Duration::from_secs(5)) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    for s in [&client, &upstream] {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL));
    }
    let pair = |a: &TcpStream, b: &TcpStream| (a.try_clone(), b.try_clone());
    if let (Ok(c), Ok(u)) = pair(&client, &upstream) {
        let f = flags.clone();
        thread::spawn(move || pump(c, u, &f, true));
    }
    let f = flags.clone();
    thread::spawn(move || pump(upstream, client, &f, false));
}

/// Copies `from` to `to` until either closes or the link is cut; with `holdable`, reads
/// nothing while the link holds.
fn pump(mut from: TcpStream, mut to: TcpStream, flags: &Flags, holdable: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !flags.cut.load(Ordering::SeqCst) {
        if holdable && flags.hold.load(Ordering::SeqCst) {
            thread::sleep(POLL);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
