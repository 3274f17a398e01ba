//! Test harness shared by Gatehouse's end-to-end tests: real `gatehouse`
//! processes on ephemeral loopback ports, a throwaway PostgreSQL cluster
//! started with `initdb`/`pg_ctl`, and small HTTP and HTTPS upstreams, with
//! certificates made on the spot (`tls`). Nothing here mocks the database
//! or the network.

pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Retry `$cond` (an expression yielding `bool`) until it holds or the
/// deadline passes, then fail with `$msg`.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }};
}

/// A free loopback port. Another process could take it before we bind it,
/// which on a test machine is rare enough to accept.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("loopback is available")
}

/// A running `gatehouse standalone`.
pub struct Gatehouse {
    child: Child,
    pub admin: String,
    pub proxy: String,
    pub proxy_addr: SocketAddr,
    /// The `ssl` proxy listener.
    pub proxy_tls_addr: SocketAddr,
    pub prefix: PathBuf,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Gatehouse {
    /// Start with a fresh prefix and the given extra environment.
    pub fn start(bin: &str, env: &[(&str, &str)]) -> Gatehouse {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = dir.path().join("prefix");
        let mut g = Gatehouse::start_in(bin, &prefix, env);
        g._dir = Some(dir);
        g
    }

    /// Start on an existing prefix (to test restarts).
    pub fn start_in(bin: &str, prefix: &Path, env: &[(&str, &str)]) -> Gatehouse {
        Gatehouse::start_role(bin, "standalone", prefix, env)
    }

    /// Start `gatehouse <role>` (`standalone`, `cp` or `dp`) on `prefix`.
    /// A data plane has no Admin API: it is ready when its proxy answers.
    pub fn start_role(bin: &str, role: &str, prefix: &Path, env: &[(&str, &str)]) -> Gatehouse {
        std::fs::create_dir_all(prefix).expect("prefix dir");
        let admin_port = free_port();
        let proxy_port = free_port();
        let proxy_tls_port = free_port();
        let log = prefix.join(format!("test-{admin_port}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin);
        cmd.arg(role)
            .env("GATEHOUSE_PREFIX", prefix)
            .env("GATEHOUSE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env(
                "GATEHOUSE_PROXY_LISTEN",
                format!("127.0.0.1:{proxy_port}, 127.0.0.1:{proxy_tls_port} ssl"),
            )
            .env("GATEHOUSE_WORKER_THREADS", "2")
            .env("GATEHOUSE_LOG_LEVEL", "info")
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("gatehouse starts");
        let mut g = Gatehouse {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            proxy_addr: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            proxy_tls_addr: SocketAddr::from(([127, 0, 0, 1], proxy_tls_port)),
            prefix: prefix.to_path_buf(),
            _dir: None,
            log,
        };
        g.wait_ready(role == "dp");
        g
    }

    fn wait_ready(&mut self, proxy_only: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = if proxy_only {
            self.proxy_addr
        } else {
            self.admin
                .trim_start_matches("http://")
                .parse()
                .expect("addr")
        };
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gatehouse exited with {status} before it was ready:\n{}",
                    self.log_text()
                );
            }
            match raw_request(addr, "GET", "/status", &[], b"") {
                Ok((200, _)) => return,
                Ok((status, _)) if proxy_only && status > 0 => return,
                _ => {}
            }
            if Instant::now() > deadline {
                panic!("gatehouse did not become ready:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the process so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status is readable");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send SIGTERM and wait for the exit status. The prefix stays until
    /// the value is dropped, so a test can restart on it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gatehouse ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal blocking HTTP/1.1 request (Connection: close) returning the
/// status and the body; enough for readiness checks and raw edge cases.
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => buf[i + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

/// A throwaway PostgreSQL cluster, started once per test binary.
pub struct Postgres {
    pub url: String,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    as_user: Option<String>,
}

fn pg_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("GATEHOUSE_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// The shared cluster of this test binary; panics with instructions if
    /// PostgreSQL is not installed (the test script installs it).
    pub fn shared() -> &'static Postgres {
        static PG: OnceLock<Postgres> = OnceLock::new();
        PG.get_or_init(Postgres::start)
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin_dir.join(program);
        let mut cmd = match &self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    fn start() -> Postgres {
        let bin_dir = pg_bin_dir().expect(
            "PostgreSQL server binaries not found under /usr/lib/postgresql; run scripts/test (it installs them)",
        );
        // initdb refuses to run as root, so the cluster belongs to the
        // postgres system user when we are root.
        let as_user = is_root().then(|| "postgres".to_owned());
        let base = std::env::temp_dir().join(format!("gatehouse-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("pg base dir");
        let data_dir = base.join("data");
        if let Some(user) = &as_user {
            let ok = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&base)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot chown {} to {user}", base.display());
        }
        let port = free_port();
        let pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            data_dir: data_dir.clone(),
            bin_dir,
            as_user,
        };
        let data = data_dir.to_string_lossy().into_owned();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=200",
            base.display()
        );
        let log = base.join("pg.log").to_string_lossy().into_owned();
        let out = pg.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        pg
    }

    /// A fresh, empty database in the shared cluster.
    pub fn fresh_database(&self, name: &str) -> String {
        let out = self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port(),
                "-U",
                "postgres",
                name,
            ],
        );
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port())
    }

    fn port(&self) -> String {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .unwrap_or("5432")
            .to_owned()
    }

    /// Run SQL through psql and return its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port(),
                "-U",
                "postgres",
                "-d",
                database,
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Postgres {
    /// Stop the cluster. The shared cluster lives in a static, which Rust
    /// never drops, so the test script also stops leftovers it finds.
    pub fn stop(&self) {
        let data = self.data_dir.to_string_lossy().into_owned();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

/// An HTTP/1.1 upstream on loopback that answers every request with a JSON
/// echo of what it received (method, path, headers, body length and byte
/// sum). Bodies may have a `Content-Length` or be chunked.
pub struct EchoUpstream {
    pub addr: SocketAddr,
}

impl EchoUpstream {
    pub fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    serve_echo(stream);
                });
            }
        });
        EchoUpstream { addr }
    }
}

/// Serves echo answers on one connection until it closes.
pub fn serve_echo<S: Read + Write>(stream: S) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut headers = serde_json::Map::new();
        let mut content_length = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().to_owned();
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                }
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
                headers.insert(k, serde_json::Value::String(v));
            }
        }
        let Some(seen) = read_body(&mut reader, content_length, chunked) else {
            return;
        };
        let doc = serde_json::json!({
            "method": method, "path": path, "headers": headers, "body_len": seen.len,
            "body_sum": seen.sum, "body": String::from_utf8_lossy(&seen.head),
        });
        let out = doc.to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            out.len(),
            out
        );
        let writer = reader.get_mut();
        if writer
            .write_all(resp.as_bytes())
            .and_then(|()| writer.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Reads a body, keeping only its length, byte sum and first 64 KiB.
fn read_body<R: BufRead>(reader: &mut R, content_length: usize, chunked: bool) -> Option<BodySeen> {
    let mut seen = BodySeen::default();
    if !chunked {
        seen.discard(reader, content_length)?;
        return Some(seen);
    }
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).ok()?;
        let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                let mut trailer = String::new();
                reader.read_line(&mut trailer).ok()?;
                if trailer.trim_end().is_empty() {
                    return Some(seen);
                }
            }
        }
        seen.discard(reader, size)?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

#[derive(Default)]
struct BodySeen {
    len: u64,
    sum: u64,
    /// The first bytes, for tests that check what arrived.
    head: Vec<u8>,
}

const BODY_KEPT: usize = 64 * 1024;

impl BodySeen {
    fn discard<R: Read>(&mut self, reader: &mut R, mut n: usize) -> Option<()> {
        let mut buf = [0u8; 16 * 1024];
        while n > 0 {
            let want = n.min(buf.len());
            reader.read_exact(&mut buf[..want]).ok()?;
            self.len += want as u64;
            self.sum += buf[..want].iter().map(|b| u64::from(*b)).sum::<u64>();
            let room = BODY_KEPT.saturating_sub(self.head.len()).min(want);
            self.head.extend_from_slice(&buf[..room]);
            n -= want;
        }
        Some(())
    }
}

/// A throwaway `redis-server` on a free loopback port, without
/// persistence; stopped when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    /// Sends one command in Redis's inline form and returns the raw reply.
    pub fn command(&self, line: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(format!("{line}\r\n").as_bytes())
            .expect("write");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
