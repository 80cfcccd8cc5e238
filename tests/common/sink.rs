//! Postfix's smtp-sink as a receiving peer, with its fault switches (`-r RCPT` 4xx, `-f RCPT`
//! 5xx, `-Q MAIL` 421), dumping each transaction to a file. Killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sink {
    pub fn start(flags: &[&str]) -> Sink {
        Sink::start_at(super::pebble::free_port(), flags)
    }

    /// On a given port, so a sender configured for it finds a restarted sink.
    pub fn start_at(port: u16, flags: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
        std::fs::set_permissions(dir.path(), perms).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let template = format!("{}/%H%M%S.", dir.path().display());
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "nobody", "-d", &template])
            .args(flags)
            .arg(format!("127.0.0.1:{port}"))
            .arg("10")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink");
        let sink = Sink { child, addr, dir };
        super::wait_for("smtp-sink", Duration::from_secs(10), || std::net::TcpStream::connect(addr).is_ok());
        sink
    }

    pub fn dumps(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().path()).collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
