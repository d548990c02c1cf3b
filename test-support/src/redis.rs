//! Real `redis-server` processes on ephemeral loopback ports.
//!
//! Never touches a Redis on the standard port: every server gets a fresh port and a temporary
//! directory, and is killed when its handle is dropped.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One `redis-server` process.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    ///
    /// A free port can be taken by another process before the server binds it (test binaries
    /// run side by side): a server that exits at start is tried again on another port.
    pub fn start_with(extra: &[&str]) -> Self {
        for _attempt in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("llmgate-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create redis dir");
            let mut server = Self { port, child: None, dir, extra: extra.iter().map(|s| s.to_string()).collect() };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would: no shutdown, no save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and waits for `PING`.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server could not listen on port {} again", self.port);
    }

    /// Spawns the server and waits until it answers `PING`; `false` when it exited first (its
    /// port was taken). The answer must come from this child: another server on the port would
    /// answer too.
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            if command(self.port, &["PING"]).as_deref() == Some("+PONG") {
                // Still ours after the answer: it bound the port.
                return child.try_wait().ok().flatten().is_none();
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one command over a fresh connection and returns the first line of the reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` masters (no replicas) on loopback.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` nodes, assigns the 16384 slots evenly and waits until the cluster is `ok`.
    pub fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]))
            .collect();
        let per_node = 16384 / n;
        for (i, node) in nodes.iter().enumerate() {
            let first = i * per_node;
            let last = if i + 1 == n { 16383 } else { first + per_node - 1 };
            let slots: Vec<String> = (first..=last).map(|s| s.to_string()).collect();
            let mut args = vec!["CLUSTER", "ADDSLOTS"];
            args.extend(slots.iter().map(String::as_str));
            assert_eq!(node.command(&args).as_deref(), Some("+OK"), "ADDSLOTS");
        }
        for node in &nodes[1..] {
            let port = node.port().to_string();
            assert_eq!(nodes[0].command(&["CLUSTER", "MEET", "127.0.0.1", &port]).as_deref(), Some("+OK"));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all_ok = nodes.iter().all(|node| {
                command_bulk(node.port(), &["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains(&format!("cluster_known_nodes:{n}"))
                })
            });
            if all_ok {
                break;
            }
            assert!(Instant::now() < deadline, "redis cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { nodes }
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

fn roundtrip(port: u16, args: &[&str]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(&encode(args)).ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if complete(&reply) {
            break;
        }
    }
    Some(reply)
}

/// Whether a RESP reply of the simple kinds used here (status, error, integer, bulk) is complete.
fn complete(reply: &[u8]) -> bool {
    let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if reply[0] != b'$' {
        return true;
    }
    let len: i64 = std::str::from_utf8(&reply[1..end]).ok().and_then(|s| s.parse().ok()).unwrap_or(-1);
    len < 0 || reply.len() >= end + 2 + len as usize + 2
}

fn command(port: u16, args: &[&str]) -> Option<String> {
    let reply = roundtrip(port, args)?;
    let text = String::from_utf8_lossy(&reply);
    text.lines().next().map(str::to_string)
}

fn command_bulk(port: u16, args: &[&str]) -> Option<String> {
    roundtrip(port, args).map(|reply| String::from_utf8_lossy(&reply).into_owned())
}
