//! `plumb`: run, validate and inspect alignment recipes.
//!
//! Exit codes: 0 success; 1 a user error (bad recipe, data or plugin, a stage that
//! failed on its input, an option's value out of range or not a number); 2 an internal
//! error (a panic in a plugin, a broken invariant) or a command line that does not parse
//! (an unknown option, a missing argument); 130 the run stopped cleanly on Ctrl-C
//! (SIGINT); 143 the run stopped cleanly on SIGTERM (as schedulers stop jobs).
//! Options that take numbers accept negative ones as values (`--temperature -1`), so a
//! value out of range is reported as such.
mod bench;
mod bench_lora;
mod data_cmd;
mod device;
mod eval;
mod explain;
mod generate;
mod launch;
mod lora_cmd;
mod new_cmd;
mod output_dir;
mod plugins;
mod recipes_cmd;
mod run;
mod scaling_cmd;
mod summary;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "plumb",
    version,
    about = "The alignment pipeline for language models, on libtorch",
    after_help = "Environment:\n  \
        PLUMB_LOG           log filter: error, warn, info (default), debug, trace, or per module \
                            (`plumb=debug,info`)\n  \
        NO_COLOR            set (to anything) for logs without colour; logs are plain whenever \
                            stderr is not a terminal\n  \
        PLUMB_PLUGIN_PATH   directories searched for plugins, `:`-separated, before the one holding plumb\n  \
        RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT\n                      \
                            a data-parallel run's launch, as torchrun sets it (or `plumb run --nproc N`)\n  \
        PLUMB_DIST_TIMEOUT  seconds a rank waits for the others, at the start and in each collective \
                            (default 1800)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe: validate everything, then run its stages in order.
    Run {
        /// The recipe file (YAML).
        recipe: PathBuf,
        /// Overrides, e.g. `stages.pretrain.config.max_steps=10` or `run.seed=3`.
        overrides: Vec<String>,
        /// Continue each stage from its latest checkpoint (stages already finished are
        /// not run again).
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Delete the files of an earlier run in the output directory, then run. Without
        /// it (or --resume), a run into a directory that holds an earlier run is refused.
        #[arg(long)]
        overwrite: bool,
        /// Run data-parallel in N processes on this machine (as `torchrun --nproc-per-node N`):
        /// starts N ranks of this command, stops them all when one fails, and exits with its
        /// code. Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) leave it out.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// The port rank 0's store listens on with --nproc (default: a free one).
        #[arg(long, value_name = "PORT", requires = "nproc")]
        master_port: Option<u16>,
    },
    /// Check a recipe (and its plugins' sections) and print it fully resolved: overrides
    /// applied, every default of every section filled in.
    Validate {
        /// The recipe file (YAML).
        recipe: PathBuf,
        /// Overrides, e.g. `stages.pretrain.config.max_steps=10` or `run.seed=3`.
        overrides: Vec<String>,
    },
    /// Run one evaluator on a checkpoint: `plumb eval --model DIR --evaluator PLUGIN.NAME
    /// [key=value ...]`.
    Eval(eval::EvalArgs),
    /// List the plugins found on PLUMB_PLUGIN_PATH and next to this executable.
    Plugins,
    /// Every option of a stage, evaluator or reward (`plumb explain sft.sft`), or of the
    /// recipe's `run:` section (`plumb explain`), with its type, default and meaning.
    Explain(explain::ExplainArgs),
    /// Continue a prompt with a model in HF layout (temperature 0 = greedy).
    Generate(generate::GenerateArgs),
    /// Data preparation: `plumb data filter` curates corpora.
    #[command(subcommand)]
    Data(data_cmd::Data),
    /// LoRA adapters: `plumb lora merge ADAPTER -o DIR` saves the merged model.
    #[command(subcommand)]
    Lora(lora_cmd::Lora),
    /// Benchmarks that print figures: a table, or JSON lines with --json.
    Bench(bench::BenchArgs),
    /// Scaling laws: fit sweeps (`plumb scaling fit RUN_DIR`), plan a compute budget.
    #[command(subcommand)]
    Scaling(scaling_cmd::Scaling),
    /// Create a project to start from: `plumb new plugin NAME` writes a plugin crate.
    #[command(subcommand)]
    New(new_cmd::New),
    /// List the recipes shipped with plumb, with what each does.
    Recipes,
    /// Copy a shipped recipe to start from: `plumb init quickstart my_run.yaml`.
    Init(recipes_cmd::InitArgs),
}

/// Colour in logs only for a person at a terminal: not in a file or a pipe, and not when
/// `NO_COLOR` is set (https://no-color.org).
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An error with the exit code it deserves.
#[derive(Debug)]
pub enum Failure {
    /// Bad input: the user can fix it.
    User(String),
    /// A bug or broken environment.
    Internal(String),
    /// Stopped on request (SIGINT or SIGTERM) after saving.
    Cancelled(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::User(_) => 1,
            Failure::Internal(_) => 2,
            Failure::Cancelled(_) => run::stop_exit_code(),
        }
    }
}

/// Makes glibc's allocator keep freed memory for the next step instead of handing it back
/// to the kernel at each free: a training step frees and reallocates the same activations
/// every time, and with glibc's defaults about a tenth of a small model's CPU step went to
/// the kernel zeroing fresh pages (`perf`: `clear_page_erms` under `do_anonymous_page`).
/// `plumb bench ppo`: about +9% episodes/s. The heap now shrinks only past 1 GiB free and
/// grows 256 MiB at a time. Blocks up to 32 MiB (glibc's largest mmap threshold) come from
/// the heap too: with the threshold at its 128 KiB start, which a set trim threshold keeps
/// fixed, a small model's activations and logits were each a fresh mapping, zeroed by the
/// kernel and unmapped at their free (`plumb bench ppo`: a further +6%). Larger blocks
/// still go back at once. The user's own `MALLOC_*` variables win, since glibc reads them
/// first and we skip then.
fn keep_freed_memory() {
    if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_")) {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A bad value is the user's to fix, like the checks each command makes itself.
            let bad_value = matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation);
            let _ = e.print();
            return match (e.use_stderr(), bad_value) {
                (false, _) => ExitCode::SUCCESS, // --help, --version
                (true, true) => ExitCode::from(1),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLUMB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Run { nproc: Some(nproc), master_port, .. } => return launched(launch::run(nproc, master_port)),
        Command::Run { recipe, overrides, resume, overwrite, nproc: None, master_port: _ } => {
            let mode = match (resume, overwrite) {
                (true, _) => run::Mode::Resume,
                (false, true) => run::Mode::Overwrite,
                (false, false) => run::Mode::Run,
            };
            run::run(&recipe, &overrides, mode)
        }
        Command::Validate { recipe, overrides } => run::run(&recipe, &overrides, run::Mode::Validate),
        Command::Eval(args) => eval::run(&args),
        Command::Plugins => plugins::list(),
        Command::Explain(args) => explain::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => match bench::ranks_to_launch(&args) {
            Ok(Some((nproc, master_port))) => return launched(launch::run(nproc, master_port)),
            Ok(None) => bench::run(&args),
            Err(failure) => Err(failure),
        },
        Command::Data(data) => data_cmd::run(&data),
        Command::Lora(lora) => lora_cmd::run(&lora),
        Command::New(new) => new_cmd::run(&new),
        Command::Scaling(scaling) => scaling_cmd::run(&scaling),
        Command::Recipes => recipes_cmd::list(),
        Command::Init(args) => recipes_cmd::init(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (Failure::User(m) | Failure::Internal(m) | Failure::Cancelled(m)) = &failure;
            eprintln!("error: {m}");
            ExitCode::from(failure.exit_code())
        }
    }
}

/// The exit code of a launcher of ranks (`launch::run`), its own error printed.
fn launched(result: Result<ExitCode, Failure>) -> ExitCode {
    result.unwrap_or_else(|failure| {
        let (Failure::User(m) | Failure::Internal(m) | Failure::Cancelled(m)) = &failure;
        eprintln!("error: {m}");
        ExitCode::from(failure.exit_code())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument of every subcommand says what it is for.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "plumb", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }
}
