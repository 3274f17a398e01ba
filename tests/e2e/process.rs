//! Process behaviour: configuration errors, busy ports, signals.

use std::process::Command;

use gatehouse_test_support::Gatehouse;

use crate::BIN;

#[test]
fn bad_configuration_exits_64_with_a_message() {
    let dir = tempfile_dir();
    let out = Command::new(BIN)
        .arg("standalone")
        .env("GATEHOUSE_PREFIX", &dir)
        .env("GATEHOUSE_ADMIN_LISTEN", "not-an-address")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin_listen"), "{err}");
}

#[test]
fn busy_port_fails_clearly() {
    let g = Gatehouse::start(BIN, &[]);
    let dir = tempfile_dir();
    let admin = g.admin.trim_start_matches("http://").to_owned();
    let out = Command::new(BIN)
        .arg("standalone")
        .env("GATEHOUSE_PREFIX", &dir)
        .env("GATEHOUSE_ADMIN_LISTEN", &admin)
        .env("GATEHOUSE_PROXY_LISTEN", "127.0.0.1:0")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {admin}")), "{err}");
}

#[test]
fn sigterm_exits_cleanly() {
    let mut g = Gatehouse::start(BIN, &[]);
    let status = g.terminate();
    assert!(status.success(), "{status}");
}

#[test]
fn help_explains_commands() {
    let out = Command::new(BIN)
        .args(["standalone", "--help"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("GATEHOUSE_ADMIN_LISTEN"), "{text}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gh-proc-{}-{}",
        std::process::id(),
        gatehouse_test_support::free_port()
    ));
    std::fs::create_dir_all(&d).expect("dir");
    d
}
