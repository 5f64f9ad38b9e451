//! `plumb run --nproc N` (and `plumb bench allreduce`): the one-machine launcher, as
//! `torchrun --nproc-per-node N`. It starts N copies of this very command (without
//! `--nproc`) with torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), waits for them, and when one fails
//! stops the others (SIGTERM, then SIGKILL after [`GRACE`]) and exits with the failed
//! rank's code.
use std::ffi::OsString;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Failure;

/// How long the other ranks have to end after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// This command's arguments without the launcher's own (`--nproc`, `--master-port`).
pub fn rank_arguments(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if text == "--nproc" || text == "--master-port" {
            skip_value = true;
        } else if !(text.starts_with("--nproc=") || text.starts_with("--master-port=")) {
            out.push(arg);
        }
    }
    out
}

/// The exit code a finished rank reports: its own, or 128 + the signal that ended it.
fn code_of(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

fn terminate(child: &Child) {
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

/// Runs `nproc` ranks of this command on this machine; the run's exit code.
pub fn run(nproc: usize, master_port: Option<u16>) -> Result<ExitCode, Failure> {
    if nproc == 0 {
        return Err(Failure::User("--nproc 0: expected at least 1 process".into()));
    }
    if let Some(var) = ["RANK", "WORLD_SIZE"].into_iter().find(|v| std::env::var_os(v).is_some()) {
        return Err(Failure::User(format!(
            "--nproc starts the ranks itself, but {var} is already set: under torchrun (or with the variables \
             set by hand) run the command without --nproc"
        )));
    }
    let port = match master_port {
        Some(port) => port,
        // A port free now (the OS's pick for a socket closed at once); rank 0's store binds it.
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Failure::Internal(format!("cannot find a free port for the ranks' store: {e}")))?,
    };
    let exe = std::env::current_exe().map_err(|e| Failure::Internal(format!("cannot find this executable: {e}")))?;
    let args = rank_arguments(std::env::args_os().skip(1));
    // Ctrl-C reaches the ranks themselves (they share the terminal's process group): the
    // launcher waits for them to save and stop. A SIGTERM sent to the launcher alone is passed on.
    let interrupted = Arc::new(AtomicBool::new(false));
    let terminated = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&terminated)))
        .map_err(|e| Failure::Internal(format!("cannot install the launcher's signal handlers: {e}")))?;
    tracing::info!("starting {nproc} ranks on this machine, store at 127.0.0.1:{port}");

    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                children.iter().flatten().for_each(terminate);
                return Err(Failure::Internal(format!("cannot start rank {rank} ({}): {e}", exe.display())));
            }
        }
    }

    let mut failed: Option<(usize, u8)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut passed_on = false;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("cannot wait for rank {rank}: {e}");
                    continue;
                }
            };
            *slot = None;
            if !status.success() && failed.is_none() {
                let code = code_of(status);
                failed = Some((rank, code));
                eprintln!("plumb run --nproc: rank {rank} exited with code {code}; stopping the other ranks");
            }
        }
        if (failed.is_some() || terminated.load(Ordering::SeqCst)) && !passed_on {
            passed_on = true;
            children.iter().flatten().for_each(terminate);
            kill_at = Some(Instant::now() + GRACE);
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for (rank, child) in children.iter_mut().enumerate() {
                if let Some(child) = child {
                    eprintln!("plumb run --nproc: rank {rank} did not stop within {GRACE:?}; killing it");
                    let _ = child.kill();
                }
            }
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(match failed {
        Some((_, code)) => ExitCode::from(code),
        None if interrupted.load(Ordering::SeqCst) => ExitCode::from(130),
        None => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_launcher_arguments_only() {
        let args = ["run", "r.yaml", "--nproc", "2", "a.b=1", "--master-port=29501", "--resume", "--nproc=3"];
        let kept = rank_arguments(args.iter().map(OsString::from));
        assert_eq!(kept, ["run", "r.yaml", "a.b=1", "--resume"].map(OsString::from));
    }
}
