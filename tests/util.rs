//! The test harness: a real PostgreSQL server, and a fresh migrated database per test.
//!
//! The server comes from `CHRONICLE_TEST_DATABASE_URL` or `DATABASE_URL` when set, else
//! the local default (127.0.0.1:5432, user `postgres`), else a throwaway cluster started
//! from the installed PostgreSQL binaries for this test run; else the run fails saying
//! what to install. No database test is ever skipped.
//!
//! The helpers that shell out to Unix tools (`kill`, `sh`, `id`, `runuser`) are
//! `#[cfg(unix)]`, and so are the tests that use them: on Windows the rest compiles and
//! runs against a server given by CHRONICLE_TEST_DATABASE_URL or at 127.0.0.1:5432.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
#[cfg(unix)]
use std::process::Output;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use chronicle::config::DbUrl;
use postgres::config::Host;
use postgres::{Client, NoTls};

/// How to reach the test server.
#[derive(Debug, Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// A unix-socket directory on this machine where the server also listens, if any.
    pub socket_dir: Option<String>,
    /// Where the server came from, for messages.
    pub origin: String,
    /// The data directory when this run started the cluster itself.
    pub cluster_dir: Option<PathBuf>,
    /// The server binaries, when known (used by tests that restart a server).
    pub bin_dir: Option<PathBuf>,
}

impl Server {
    /// A libpq key=value connection string for `dbname`.
    pub fn key_value(&self, dbname: &str) -> String {
        let mut s = format!("host={} port={} user={} dbname={}", self.host, self.port, self.user, dbname);
        if let Some(p) = &self.password {
            s.push_str(&format!(" password='{}'", p.replace('\\', "\\\\").replace('\'', "\\'")));
        }
        s
    }

    /// A `postgresql://` URL for `dbname` with the given scheme.
    pub fn url_with_scheme(&self, scheme: &str, dbname: &str) -> String {
        let auth = match &self.password {
            Some(p) => format!("{}:{}", pct(&self.user), pct(p)),
            None => pct(&self.user),
        };
        let host = if self.host.starts_with('/') { pct(&self.host) } else { self.host.clone() };
        format!("{scheme}://{auth}@{host}:{}/{dbname}", self.port)
    }

    pub fn url(&self, dbname: &str) -> String {
        self.url_with_scheme("postgresql", dbname)
    }

    pub fn connect(&self, dbname: &str) -> Client {
        let cfg: postgres::Config = self.key_value(dbname).parse().expect("harness connection string");
        cfg.connect(NoTls).unwrap_or_else(|e| panic!("connecting to the test server ({}) failed: {e}", self.origin))
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The test server, found or started once per test binary.
pub fn server() -> &'static Server {
    SERVER.get_or_init(find_or_start_server)
}

fn find_or_start_server() -> Server {
    for var in ["CHRONICLE_TEST_DATABASE_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var) {
            let parsed = DbUrl::parse(&url).unwrap_or_else(|e| panic!("{var} {e}"));
            let s = server_from_config(&parsed.config, &format!("{var} ({parsed})"));
            try_connect(&s).unwrap_or_else(|e| panic!("{var} is set but its server does not answer: {e}"));
            return s;
        }
    }
    let local = Server {
        host: "127.0.0.1".into(),
        port: 5432,
        user: "postgres".into(),
        password: None,
        socket_dir: None,
        origin: "the local server at 127.0.0.1:5432".into(),
        cluster_dir: None,
        bin_dir: find_bin_dir(),
    };
    if try_connect(&local).is_ok() {
        return with_socket_dir(local);
    }
    match start_cluster() {
        Ok(s) => s,
        Err(why) => panic!(
            "no PostgreSQL server for the tests: CHRONICLE_TEST_DATABASE_URL and DATABASE_URL are unset, \
             nothing answers at 127.0.0.1:5432 as user postgres, and a throwaway cluster could not be \
             started ({why}). Install the PostgreSQL server (e.g. `apt-get install postgresql`, \
             `brew install postgresql`) or point CHRONICLE_TEST_DATABASE_URL at a server where the user \
             may create databases."
        ),
    }
}

fn server_from_config(cfg: &postgres::Config, origin: &str) -> Server {
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "127.0.0.1".into(),
    };
    let s = Server {
        host,
        port: cfg.get_ports().first().copied().unwrap_or(5432),
        user: cfg.get_user().unwrap_or("postgres").to_string(),
        password: cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()),
        socket_dir: None,
        origin: origin.to_string(),
        cluster_dir: None,
        bin_dir: find_bin_dir(),
    };
    with_socket_dir(s)
}

fn try_connect(s: &Server) -> Result<(), String> {
    let mut cfg: postgres::Config = s.key_value("postgres").parse().map_err(|e| format!("{e}"))?;
    cfg.connect_timeout(std::time::Duration::from_secs(5));
    let mut c = cfg.connect(NoTls).map_err(|e| format!("{e}"))?;
    c.simple_query("SELECT 1").map_err(|e| format!("{e}"))?;
    Ok(())
}

/// Finds a unix-socket directory of the server on this machine, if it has one.
fn with_socket_dir(mut s: Server) -> Server {
    if s.host.starts_with('/') {
        s.socket_dir = Some(s.host.clone());
        return s;
    }
    let Ok(mut c) = s.key_value("postgres").parse::<postgres::Config>().and_then(|c| c.connect(NoTls)) else {
        return s;
    };
    if let Ok(row) = c.query_one("SELECT current_setting('unix_socket_directories')", &[]) {
        let dirs: String = row.get(0);
        for d in dirs.split(',').map(str::trim) {
            if Path::new(d).join(format!(".s.PGSQL.{}", s.port)).exists() {
                s.socket_dir = Some(d.to_string());
                break;
            }
        }
    }
    s
}

/// The directory of the installed server binaries (initdb, pg_ctl, postgres).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    candidates.into_iter().rev().find(|p| p.join("initdb").exists())
}

#[cfg(unix)]
fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs a server binary, as the `postgres` OS user when we are root (initdb and
/// postgres refuse to run as root).
#[cfg(unix)]
pub fn pg_command(bin_dir: &Path, program: &str) -> Command {
    let path = bin_dir.join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A throwaway cluster owned by the caller: started here, stopped by `stop` or when the
/// test process exits (a watchdog shell waits for our pid, then stops it and removes it).
#[cfg(unix)]
pub struct Cluster {
    pub server: Server,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
}

#[cfg(unix)]
impl Cluster {
    pub fn start(extra_conf: &[&str]) -> Result<Cluster, String> {
        let bin_dir = find_bin_dir().ok_or("no PostgreSQL server binaries (initdb) found")?;
        let (dir, port) = Cluster::new_dir()?;
        let data = dir.join("data");
        let out = pg_command(&bin_dir, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Cluster::launch(bin_dir, dir, port, extra_conf)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`: it follows the primary
    /// until promoted), started with `extra_conf`, stopped like any other cluster.
    pub fn standby_of(primary: &Cluster, extra_conf: &[&str]) -> Result<Cluster, String> {
        let (dir, port) = Cluster::new_dir()?;
        let out = pg_command(&primary.bin_dir, "pg_basebackup")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-h", "127.0.0.1", "-p", &primary.server.port.to_string(), "-U", "postgres"])
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .output()
            .map_err(|e| format!("running pg_basebackup: {e}"))?;
        if !out.status.success() {
            return Err(format!("pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Cluster::launch(primary.bin_dir.clone(), dir, port, extra_conf)
    }

    /// A fresh folder for a cluster (owned by the postgres user when we are root), and a
    /// free port for it.
    fn new_dir() -> Result<(PathBuf, u16), String> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("chronicle-test-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
            if !ok.map(|s| s.success()).unwrap_or(false) {
                return Err("cannot chown the cluster folder to the postgres user".into());
            }
        }
        Ok((dir, port))
    }

    /// The server options of a cluster in `dir` on `port`, for `pg_ctl start -o`.
    pub fn options(dir: &Path, port: u16, extra_conf: &[&str]) -> String {
        let mut opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200", dir.display());
        for c in extra_conf {
            opts.push_str(&format!(" -c {c}"));
        }
        opts
    }

    /// Starts the cluster in `dir/data` and a watchdog that stops and removes it when
    /// this test process ends.
    fn launch(bin_dir: PathBuf, dir: PathBuf, port: u16, extra_conf: &[&str]) -> Result<Cluster, String> {
        let data = dir.join("data");
        let opts = Cluster::options(&dir, port, extra_conf);
        let out = pg_command(&bin_dir, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("running pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("pg_ctl start failed: {}{log}", String::from_utf8_lossy(&out.stderr)));
        }
        // The watchdog: when this test process ends, stop the cluster and remove it.
        let stop =
            pg_command(&bin_dir, "pg_ctl").get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let runner = pg_command(&bin_dir, "pg_ctl").get_program().to_string_lossy().into_owned();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {runner} {} -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            stop.join(" "),
            data.display(),
            dir.display(),
            pid = std::process::id()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the cluster watchdog: {e}"))?;
        let server = Server {
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            password: None,
            socket_dir: Some(dir.display().to_string()),
            origin: format!("a throwaway cluster in {}", dir.display()),
            cluster_dir: Some(data.clone()),
            bin_dir: Some(bin_dir.clone()),
        };
        Ok(Cluster { server, dir, bin_dir })
    }

    /// Runs `pg_ctl` on this cluster with extra arguments (restart, stop, start).
    pub fn pg_ctl(&self, args: &[&str]) -> Output {
        pg_command(&self.bin_dir, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .output()
            .expect("running pg_ctl")
    }
}

#[cfg(unix)]
fn start_cluster() -> Result<Server, String> {
    let c = Cluster::start(&["fsync=off"])?;
    eprintln!("test harness: started {}", c.server.origin);
    Ok(c.server)
}

/// The throwaway cluster's watchdog is a shell script: not on Windows.
#[cfg(not(unix))]
fn start_cluster() -> Result<Server, String> {
    Err("a throwaway cluster needs a Unix shell".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh database for one test, dropped when the test ends (pass or fail).
pub struct TestDb {
    pub name: String,
    pub server: Server,
}

impl TestDb {
    /// A fresh, migrated database.
    pub fn new() -> TestDb {
        let db = TestDb::empty();
        let out = db.chronicle(&["migrate"]).output().expect("running chronicle migrate");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
        db
    }

    /// A fresh database with no schema.
    pub fn empty() -> TestDb {
        TestDb::empty_on(server())
    }

    pub fn empty_on(server: &Server) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name =
            format!("chronicle_test_{}_{}_{}", std::process::id(), n, &uuid::Uuid::now_v7().simple().to_string()[24..]);
        let mut admin = server.connect("postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating test database {name} on {}: {e}", server.origin));
        TestDb { name, server: server.clone() }
    }

    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    pub fn client(&self) -> Client {
        self.server.connect(&self.name)
    }

    /// The `chronicle` binary with this database as DATABASE_URL and a clean environment
    /// of chronicle variables.
    pub fn chronicle(&self, args: &[&str]) -> Command {
        let mut c = chronicle_cmd(args);
        c.env("DATABASE_URL", self.url());
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut cfg) = self.server.key_value("postgres").parse::<postgres::Config>() {
            cfg.connect_timeout(std::time::Duration::from_secs(5));
            if let Ok(mut admin) = cfg.connect(NoTls) {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
            }
        }
    }
}

/// The `chronicle` binary with every chronicle variable removed from its environment.
pub fn chronicle_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chronicle"));
    c.args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "DATABASE_URL" || k.starts_with("OUTBOX_") || k.starts_with("CHRONICLE_") || k == "RUST_LOG" {
            c.env_remove(k.as_ref());
        }
    }
    c.stdin(Stdio::null());
    c
}

/// Output as text, for assertions with context.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub fn run(cmd: &mut Command) -> Ran {
    let out = cmd.output().expect("running chronicle");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs with `input` on stdin.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Ran {
    use std::io::Write;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning chronicle");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("waiting for chronicle");
    let _ = writer.join();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A count from a query returning one bigint.
pub fn count(c: &mut impl postgres::GenericClient, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// A TCP proxy on loopback in front of the test server: lets a test make "the database"
/// appear late, or cut every connection through it at once.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Starts listening on `port` after `delay`, forwarding to the test server.
    pub fn start_later(port: u16, delay: std::time::Duration, target: &Server) -> Proxy {
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let target =
            format!("{}:{}", if target.host.starts_with('/') { "127.0.0.1" } else { &target.host }, target.port);
        let list = conns.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("proxy port");
            for client in listener.incoming().flatten() {
                let Ok(upstream) = std::net::TcpStream::connect(&target) else { continue };
                for s in [&client, &upstream] {
                    if let Ok(c) = s.try_clone() {
                        list.lock().unwrap().push(c);
                    }
                }
                let (mut c_r, mut u_w) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (mut u_r, mut c_w) = (upstream, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_r, &mut u_w);
                    let _ = u_w.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u_r, &mut c_w);
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy { port, conns }
    }

    /// Cuts every connection made through the proxy so far.
    pub fn cut_all(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A server that accepts TCP connections and never answers (a stopped postmaster, a
/// half-open path): the connections it accepted are kept open, unread, for the test's life.
pub struct SilentServer {
    pub port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentServer {
    pub fn start() -> SilentServer {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("silent server port");
        let port = listener.local_addr().expect("silent server address").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                held.push(conn);
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        SilentServer { port, accepted }
    }

    /// How many connections it has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A URL for it, with these extra parameters (`connect_timeout=2`).
    pub fn url(&self, params: &str) -> String {
        format!("postgresql://u:pw@127.0.0.1:{}/db?sslmode=disable{params}", self.port)
    }
}

/// A TCP proxy on loopback in front of the test server that can stop forwarding without
/// closing anything (a network gone silent mid-statement) and resume, and counts the
/// connections made through it.
pub struct PausableProxy {
    pub port: u16,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PausableProxy {
    pub fn start(target: &Server) -> PausableProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let target =
            format!("{}:{}", if target.host.starts_with('/') { "127.0.0.1" } else { &target.host }, target.port);
        let paused = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (p, a) = (paused.clone(), accepted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = std::net::TcpStream::connect(&target) else { continue };
                let (Ok(c_r), Ok(u_w)) = (client.try_clone(), upstream.try_clone()) else { continue };
                for (mut from, mut to) in [(c_r, u_w), (upstream, client)] {
                    let paused = p.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Paused: what was read is held, nothing more is read or sent.
                            while paused.load(Ordering::SeqCst) {
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        PausableProxy { port, paused, accepted }
    }

    pub fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections were made through it.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The test database's URL through the proxy.
    pub fn url(&self, db: &TestDb) -> String {
        let mut server = db.server.clone();
        server.host = "127.0.0.1".into();
        server.port = self.port;
        server.url(&db.name)
    }
}

/// Inserts `n` valid events (BookRenamed, with Chinese and English titles) into one
/// library by plain SQL, as the application would. Returns the library id.
pub fn insert_events(c: &mut Client, n: i64) -> uuid::Uuid {
    let library = uuid::Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, actor_user_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), $1, gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', '旧标题 ' || g), jsonb_build_object('title', 'Title ' || g),
                now() - (g || ' seconds')::interval
         FROM generate_series(1, $2::bigint) g",
        &[&library, &n],
    )
    .expect("inserting events");
    library
}

/// `chronicle worker` for this database with fast test settings (metrics off, short
/// poll); callers add what they test. A worker left behind by a test that failed before
/// stopping it ends by itself (`OUTBOX_RUN_SECONDS`) instead of running on, holding the
/// test runner's output open.
pub fn worker_cmd(db: &TestDb, extra: &[&str]) -> Command {
    let mut args = vec!["worker"];
    args.extend_from_slice(extra);
    let mut c = db.chronicle(&args);
    c.env("OUTBOX_METRICS_PORT", "0").env("OUTBOX_POLL_INTERVAL_SECONDS", "0.05").env("OUTBOX_RUN_SECONDS", "300");
    c
}

/// Waits until `cond` holds, polling, or panics with `what` after `timeout`.
pub fn wait_until(timeout: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends a signal by name to a process.
#[cfg(unix)]
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

/// The outbox summarised: (status, error_reason) → count.
pub fn outbox_by_status(c: &mut Client) -> std::collections::BTreeMap<String, i64> {
    c.query("SELECT status || coalesce('/' || error_reason, ''), count(*) FROM chronicle_outbox_events GROUP BY 1", &[])
        .expect("outbox summary")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts the end state of a drain: every event has exactly one entry, no entry
/// lacks its event, and every outbox row is done.
pub fn assert_fully_projected(c: &mut Client) {
    let events = count(c, "SELECT count(*) FROM chronicle_events");
    let entries = count(c, "SELECT count(*) FROM chronicle_entries");
    let missing = count(c, "SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)");
    let orphans = count(c, "SELECT count(*) FROM chronicle_entries n WHERE NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = n.id)");
    let not_done = count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'");
    assert_eq!((entries, missing, orphans, not_done), (events, 0, 0, 0), "outbox: {:?}", outbox_by_status(c));
}

/// Inserts `n` valid events into `library`; returns `n`.
pub fn insert_events_into(c: &mut Client, library: uuid::Uuid, n: i64) -> i64 {
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         SELECT gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated', jsonb_build_object('name', '标签 ' || g), now()
         FROM generate_series(1, $2::bigint) g",
        &[&library, &n],
    )
    .expect("inserting events");
    n
}

/// The application's role for one test (row-level security: it sees only the library its
/// session names), dropped with what it owns and was granted when the test ends, even
/// when it fails: roles outlive test databases.
pub struct AppRole {
    pub name: String,
    db: String,
    server: Server,
}

impl AppRole {
    pub fn create(db: &TestDb) -> AppRole {
        let name = format!("{}_app", db.name);
        db.client()
            .batch_execute(&format!(
                "CREATE ROLE {name} NOLOGIN;
                 GRANT SELECT, INSERT ON chronicle_events TO {name};
                 GRANT SELECT ON chronicle_entries TO {name};"
            ))
            .expect("creating the application role");
        AppRole { name, db: db.name.clone(), server: db.server.clone() }
    }
}

impl Drop for AppRole {
    fn drop(&mut self) {
        let mut c = self.server.connect(&self.db);
        let _ = c.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}", self.name));
    }
}

/// The SQLSTATE of a database error (or its text when it has none).
pub fn sql_state(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("{e}"))
}

/// One HTTP GET on loopback; the body, or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    Some(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text))
}

/// The sum of a metric's samples over its label sets.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key.split('{').next()? == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A login role for one test (`{role}` in `setup` is its name), dropped with what it owns
/// and was granted when the test ends, even when it fails: roles outlive test databases.
pub struct LoginRole<'a> {
    db: &'a TestDb,
    pub name: String,
}

impl<'a> LoginRole<'a> {
    pub fn create(db: &'a TestDb, suffix: &str, setup: &str) -> LoginRole<'a> {
        let name = format!("{}_{suffix}", db.name);
        db.client().batch_execute(&format!("CREATE ROLE {name} LOGIN; {}", setup.replace("{role}", &name))).unwrap();
        LoginRole { db, name }
    }

    pub fn url(&self) -> String {
        let mut server = self.db.server.clone();
        server.user = self.name.clone();
        server.url(&self.db.name)
    }

    pub fn client(&self) -> postgres::Client {
        let mut server = self.db.server.clone();
        server.user = self.name.clone();
        server.connect(&self.db.name)
    }
}

impl Drop for LoginRole<'_> {
    fn drop(&mut self) {
        let mut c = self.db.client();
        let _ = c.batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}';
             DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
            self.name
        ));
    }
}

impl TestDb {
    /// A fresh database with no schema in the `SQL_ASCII` encoding, which stores text
    /// unchecked (`chronicle migrate` refuses it).
    pub fn sql_ascii() -> TestDb {
        let server = server();
        let name = format!("chronicle_test_{}_{}_ascii", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        server
            .connect("postgres")
            .batch_execute(&format!(
                "CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap_or_else(|e| panic!("creating test database {name} on {}: {e}", server.origin));
        TestDb { name, server: server.clone() }
    }

    /// Applies the embedded migrations and records them as `migrate` does, without its
    /// checks: a database migrated by a version that did not check the encoding.
    pub fn apply_migrations_unchecked(&self) {
        let mut c = self.client();
        c.batch_execute(
            "CREATE TABLE chronicle_schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
               checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), duration_ms bigint NOT NULL)",
        )
        .unwrap();
        for m in chronicle::db::migrate::MIGRATIONS {
            c.batch_execute(m.sql).unwrap_or_else(|e| panic!("migration {}: {e}", m.version));
            c.execute(
                "INSERT INTO chronicle_schema_migrations (version, name, checksum, duration_ms) VALUES ($1, $2, $3, 0)",
                &[&m.version, &m.name, &chronicle::db::migrate::checksum(m.sql)],
            )
            .unwrap();
        }
    }
}
