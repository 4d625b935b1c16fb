//! A small load generator and its servers: TCP request/response on persistent connections,
//! TCP connect-request-response-close, UDP request/response and bulk TCP, each over several
//! threads for a fixed time, with per-request latencies kept for percentiles.
//!
//! Threads inherit the network namespace of the thread that starts them, so calling these
//! inside `NetNs::run` measures from that namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

pub const MESSAGE: usize = 64;
const BULK_CHUNK: usize = 64 * 1024;

/// What one workload run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Transactions, connections or bytes per second, by workload.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

/// Runs `work` on `threads` threads for `duration`; each call does one operation and returns
/// its latency in ns (or an error). Returns ops/s and the latency distribution.
fn drive<S: Send + 'static>(
    threads: usize,
    duration: Duration,
    setup: impl Fn() -> Result<S> + Send + Sync + 'static,
    work: impl Fn(&mut S) -> Result<u32> + Send + Sync + 'static,
) -> Result<Stats> {
    let (setup, work) = (Arc::new(setup), Arc::new(work));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (setup, work) = (setup.clone(), work.clone());
            std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
                let mut state = setup()?;
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0;
                while start.elapsed() < duration {
                    match work(&mut state) {
                        Ok(ns) => latencies.push(ns),
                        Err(_) => {
                            errors += 1;
                            state = setup()?;
                        }
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for handle in handles {
        let (latencies, e) = handle.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        all.extend(latencies);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok(Stats {
        rate: all.len() as f64 / seconds,
        p50_us: percentile(&all, 0.5),
        p99_us: percentile(&all, 0.99),
        errors,
    })
}

fn elapsed_ns(start: Instant) -> u32 {
    u32::try_from(start.elapsed().as_nanos()).unwrap_or(u32::MAX)
}

/// Request/response on persistent connections: transactions per second.
pub fn tcp_rr(target: SocketAddr, connections: usize, duration: Duration) -> Result<Stats> {
    drive(
        connections,
        duration,
        move || {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(stream)
        },
        |stream| {
            let start = Instant::now();
            let mut buffer = [7u8; MESSAGE];
            stream.write_all(&buffer)?;
            stream.read_exact(&mut buffer)?;
            Ok(elapsed_ns(start))
        },
    )
}

/// Connect, one request/response, close: connections per second.
pub fn tcp_crr(target: SocketAddr, threads: usize, duration: Duration) -> Result<Stats> {
    drive(
        threads,
        duration,
        || Ok(()),
        move |_| {
            let start = Instant::now();
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buffer = [7u8; MESSAGE];
            stream.write_all(&buffer)?;
            stream.read_exact(&mut buffer)?;
            // Close with RST (linger 0): no TIME_WAIT piling up on the client's ports.
            nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger { l_onoff: 1, l_linger: 0 },
            )?;
            drop(stream);
            Ok(elapsed_ns(start))
        },
    )
}

/// UDP request/response: transactions per second.
pub fn udp_rr(target: SocketAddr, threads: usize, duration: Duration) -> Result<Stats> {
    drive(
        threads,
        duration,
        move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(socket)
        },
        |socket| {
            let start = Instant::now();
            let mut buffer = [7u8; MESSAGE];
            socket.send(&buffer)?;
            socket.recv(&mut buffer)?;
            Ok(elapsed_ns(start))
        },
    )
}

/// One connection writing as fast as it can: bytes per second (latency is per 64 KiB write).
pub fn tcp_bulk(target: SocketAddr, duration: Duration) -> Result<Stats> {
    let mut stats = drive(
        1,
        duration,
        move || {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            Ok(stream)
        },
        |stream| {
            let start = Instant::now();
            stream.write_all(&[7u8; BULK_CHUNK])?;
            Ok(elapsed_ns(start))
        },
    )?;
    stats.rate *= BULK_CHUNK as f64;
    Ok(stats)
}

/// A connection idle this long is given up: its client is gone (its FIN may never arrive,
/// when the translation it went through was switched off).
const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// Accepts connections on `listener` and runs `handle` on each in a thread of its own.
fn serve(listener: TcpListener, stop: Arc<AtomicBool>, handle: fn(TcpStream, &AtomicBool)) -> Result<()> {
    listener.set_nonblocking(true).context("listener")?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                handle(stream, &stop);
            });
        }
    });
    Ok(())
}

/// Reads with the stream's timeout until data, end of stream, error or IDLE_LIMIT.
fn read_some(stream: &mut TcpStream, buffer: &mut [u8], stop: &AtomicBool) -> Option<usize> {
    let idle_since = Instant::now();
    while !stop.load(Ordering::Relaxed) && idle_since.elapsed() < IDLE_LIMIT {
        match stream.read(buffer) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Echoes what each connection sends.
pub fn serve_echo(listener: TcpListener, stop: Arc<AtomicBool>) -> Result<()> {
    serve(listener, stop, |mut stream, stop| {
        let mut buffer = [0u8; MESSAGE];
        while let Some(n) = read_some(&mut stream, &mut buffer, stop) {
            if stream.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
    })
}

/// Reads and discards everything sent to it (the bulk workload's receiver).
pub fn serve_sink(listener: TcpListener, stop: Arc<AtomicBool>) -> Result<()> {
    serve(listener, stop, |mut stream, stop| {
        let mut buffer = vec![0u8; BULK_CHUNK];
        while read_some(&mut stream, &mut buffer, stop).is_some() {}
    })
}

/// Echoes UDP datagrams.
pub fn serve_udp_echo(socket: UdpSocket, stop: Arc<AtomicBool>) -> Result<()> {
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                let _ = socket.send_to(&buffer[..len], from);
            }
        }
    });
    Ok(())
}
