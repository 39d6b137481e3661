//! TLS to PostgreSQL: every sslmode against a throwaway server with TLS on (a CA and a
//! server certificate naming only `localhost`, made here with openssl) and one with TLS
//! off, through the real binary. On the TLS server the role `tls_only` may connect over
//! TCP only with TLS (pg_hba.conf), so a command that works as that role used TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use chronicle::config::DbUrl;

use crate::util::{assert_fully_projected, chronicle_cmd, insert_events, run, Cluster, Ran, Server, TestDb};

struct TlsServer {
    cluster: Cluster,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// Another CA, which did not.
    other_ca: PathBuf,
}

static TLS_SERVER: OnceLock<TlsServer> = OnceLock::new();
static PLAIN_SERVER: OnceLock<Cluster> = OnceLock::new();

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (install it: apt-get install openssl): {e}"));
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA certificate and key in `dir` as `<name>.crt`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "3",
            "-subj",
            &format!("/CN=chronicle test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// Files the server reads must be the postgres user's when it runs as that user.
fn give_to_server(path: &Path) {
    if is_root() {
        let ok = Command::new("chown").arg("postgres:postgres").arg(path).status();
        assert!(ok.map(|s| s.success()).unwrap_or(false), "chown {}", path.display());
    }
}

fn tls_server() -> &'static TlsServer {
    TLS_SERVER.get_or_init(|| {
        let cluster = Cluster::start(&["fsync=off"]).unwrap_or_else(|e| panic!("starting the TLS test cluster: {e}"));
        let dir = cluster.dir.join("tls");
        std::fs::create_dir_all(&dir).expect("creating the certificate folder");
        make_ca(&dir, "ca");
        make_ca(&dir, "other-ca");
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("writing server.ext");
        openssl(&dir, &[
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        ]);
        openssl(&dir, &[
            "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "2",
            "-days", "3", "-extfile", "server.ext", "-out", "server.crt",
        ]);
        let key = dir.join("server.key");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        }
        for f in [&dir, &dir.join("server.crt"), &key] {
            give_to_server(f);
        }
        // tls_only may use TCP only with TLS; everyone else as before.
        let hba = cluster.dir.join("data").join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\n\
             hostnossl all tls_only 0.0.0.0/0 reject\n\
             hostnossl all tls_only ::/0 reject\n\
             host all all 127.0.0.1/32 trust\n\
             host all all ::1/128 trust\n",
        )
        .expect("writing pg_hba.conf");
        give_to_server(&hba);

        let mut admin = cluster.server.connect("postgres");
        for sql in [
            "CREATE ROLE tls_only LOGIN SUPERUSER".to_string(),
            "ALTER SYSTEM SET ssl = on".to_string(),
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", dir.join("server.crt").display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
            "SELECT pg_reload_conf()".to_string(),
        ] {
            admin.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        crate::util::wait_until(std::time::Duration::from_secs(10), "the server to turn TLS on", || {
            let mut c = cluster.server.connect("postgres");
            c.query_one("SELECT current_setting('ssl')", &[]).map(|r| r.get::<_, String>(0) == "on").unwrap_or(false)
        });
        let rules = crate::util::count(&mut admin, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL");
        assert_eq!(rules, 0, "pg_hba.conf has errors");
        TlsServer { ca: dir.join("ca.crt"), other_ca: dir.join("other-ca.crt"), cluster }
    })
}

fn plain_server() -> &'static Server {
    &PLAIN_SERVER
        .get_or_init(|| Cluster::start(&["fsync=off", "ssl=off"]).unwrap_or_else(|e| panic!("starting a cluster: {e}")))
        .server
}

/// A URL for `db` on `server` through `host`, as `user`, with query parameters.
fn url(server: &Server, host: &str, user: &str, db: &str, params: &str) -> String {
    format!("postgresql://{user}@{host}:{}/{db}?{params}", server.port)
}

fn migrate_status(database_url: &str) -> Ran {
    run(chronicle_cmd(&["migrate", "--status"]).env("DATABASE_URL", database_url))
}

/// Whether the server sees the connection made by the library's `db::connect` as TLS.
fn library_connection_uses_tls(database_url: &str) -> bool {
    let parsed = DbUrl::parse(database_url).unwrap_or_else(|e| panic!("{database_url}: {e}"));
    let mut c = chronicle::db::connect(&parsed).unwrap_or_else(|e| panic!("{database_url}: {e}"));
    c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).expect("pg_stat_ssl").get(0)
}

#[test]
fn require_connects_over_tls() {
    let t = tls_server();
    let db = TestDb::empty_on(&t.cluster.server);
    let s = &t.cluster.server;
    let require = url(s, "127.0.0.1", "tls_only", &db.name, "sslmode=require");
    assert!(library_connection_uses_tls(&require));
    let r = run(chronicle_cmd(&["migrate"]).env("DATABASE_URL", &require));
    assert_eq!(r.code, Some(0), "{r}");
    // The control: the same role without TLS is turned away by the server.
    let r = migrate_status(&url(s, "127.0.0.1", "tls_only", &db.name, "sslmode=disable"));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("no encryption"), "{r}");
}

#[test]
fn prefer_uses_tls_when_offered_and_disable_never() {
    let t = tls_server();
    let db = TestDb::empty_on(&t.cluster.server);
    let s = &t.cluster.server;
    for params in ["sslmode=prefer", "sslmode=allow", "application_name=x"] {
        assert!(library_connection_uses_tls(&url(s, "127.0.0.1", "postgres", &db.name, params)), "{params}");
    }
    // prefer never checks the certificate, even with a root that did not sign it.
    let other = format!("sslmode=prefer&sslrootcert={}", t.other_ca.display());
    let r = migrate_status(&url(s, "127.0.0.1", "tls_only", &db.name, &other));
    assert_eq!(r.code, Some(0), "{r}");
    let disable = url(s, "127.0.0.1", "postgres", &db.name, "sslmode=disable");
    assert!(!library_connection_uses_tls(&disable));
    let r = migrate_status(&disable);
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn verify_full_accepts_the_named_host_and_refuses_another_name() {
    let t = tls_server();
    let db = TestDb::empty_on(&t.cluster.server);
    let s = &t.cluster.server;
    let params = format!("sslmode=verify-full&sslrootcert={}", t.ca.display());
    let r = migrate_status(&url(s, "localhost", "tls_only", &db.name, &params));
    assert_eq!(r.code, Some(0), "{r}");
    // The certificate names only localhost.
    let r = migrate_status(&url(s, "127.0.0.1", "tls_only", &db.name, &params));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("not valid for name \"127.0.0.1\"") && r.stderr.contains("verify-ca"), "{r}");
    // libpq's default root certificate, ~/.postgresql/root.crt, when sslrootcert is unset.
    let home = t.cluster.dir.join("home");
    std::fs::create_dir_all(home.join(".postgresql")).expect("creating a home folder");
    std::fs::copy(&t.ca, home.join(".postgresql").join("root.crt")).expect("copying root.crt");
    let r = run(chronicle_cmd(&["migrate", "--status"])
        .env("DATABASE_URL", url(s, "localhost", "tls_only", &db.name, "sslmode=verify-full"))
        .env("HOME", &home));
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn verify_ca_checks_the_chain_but_not_the_name() {
    let t = tls_server();
    let db = TestDb::empty_on(&t.cluster.server);
    let s = &t.cluster.server;
    let right = format!("sslmode=verify-ca&sslrootcert={}", t.ca.display());
    let r = migrate_status(&url(s, "127.0.0.1", "tls_only", &db.name, &right));
    assert_eq!(r.code, Some(0), "{r}");
    for mode in ["verify-ca", "verify-full", "require"] {
        // require with a root certificate checks the chain too, as libpq does.
        let wrong = format!("sslmode={mode}&sslrootcert={}", t.other_ca.display());
        let r = migrate_status(&url(s, "localhost", "tls_only", &db.name, &wrong));
        assert_eq!(r.code, Some(3), "{mode}: {r}");
        assert!(
            r.stderr.contains("invalid peer certificate") && r.stderr.contains("not signed by a CA"),
            "{mode}: {r}"
        );
    }
}

#[test]
fn require_against_a_server_without_tls_fails_and_prefer_connects() {
    let s = plain_server();
    let db = TestDb::empty_on(s);
    let r = migrate_status(&url(s, "127.0.0.1", "postgres", &db.name, "sslmode=require"));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("does not support TLS"), "{r}");
    let prefer = url(s, "127.0.0.1", "postgres", &db.name, "sslmode=prefer");
    assert!(!library_connection_uses_tls(&prefer));
    let r = migrate_status(&prefer);
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn unusable_root_certificates_exit_2_naming_them() {
    let t = tls_server();
    let s = &t.cluster.server;
    let junk = t.cluster.dir.join("junk.crt");
    std::fs::write(&junk, "not a certificate\n").expect("writing junk.crt");
    let missing = t.cluster.dir.join("missing.crt");
    for (path, why) in
        [(&missing, "cannot be read"), (&t.cluster.dir, "cannot be read"), (&junk, "holds no PEM certificate")]
    {
        for mode in ["verify-full", "verify-ca", "require"] {
            let params = format!("sslmode={mode}&sslrootcert={}", path.display());
            let database_url = url(s, "localhost", "tls_only", "postgres", &params);
            for args in [&["migrate", "--status"][..], &["worker", "--until-empty"]] {
                let r = run(chronicle_cmd(args).env("DATABASE_URL", &database_url).env("OUTBOX_METRICS_PORT", "0"));
                assert_eq!(r.code, Some(2), "{args:?} {params}: {r}");
                assert!(r.stderr.contains("sslrootcert") && r.stderr.contains(&path.display().to_string()), "{r}");
                assert!(r.stderr.contains(why), "{args:?} {params}: {r}");
            }
        }
    }
    // verify-* with no root certificate at all.
    let empty_home = t.cluster.dir.join("empty-home");
    std::fs::create_dir_all(&empty_home).expect("creating a home folder");
    let r = run(chronicle_cmd(&["migrate", "--status"])
        .env("DATABASE_URL", url(s, "localhost", "tls_only", "postgres", "sslmode=verify-ca"))
        .env("HOME", &empty_home));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("sslrootcert") && r.stderr.contains("root.crt"), "{r}");
}

#[test]
fn worker_drains_over_tls() {
    let t = tls_server();
    let s = &t.cluster.server;
    let db = TestDb::empty_on(s);
    let database_url = url(s, "127.0.0.1", "tls_only", &db.name, "sslmode=require");
    let r = run(chronicle_cmd(&["migrate"]).env("DATABASE_URL", &database_url));
    assert_eq!(r.code, Some(0), "{r}");
    let mut c = db.client();
    insert_events(&mut c, 300);
    let r = run(chronicle_cmd(&["worker", "--until-empty", "--concurrency", "2", "--batch-size", "50"])
        .env("DATABASE_URL", &database_url)
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_POLL_INTERVAL_SECONDS", "0.05"));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
}
