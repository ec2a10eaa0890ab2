use std::{io::Write as _, process::ExitCode};

use anyhow::Result;
use clap::Parser as _;

use tcprst::{
    bpf::attach::AttachRequest,
    cli::{
        args::{self, Cli, Command, CorrelateArgs, DoctorArgs, SnapshotArgs, TraceArgs},
        options,
    },
    cmd::{correlate, doctor, snapshot, trace},
};
use tcprst_common::stderr::{ERROR, PREFIX};

/// Bad input or an environment tracing cannot run in.
const EXIT_UNUSABLE: u8 = 2;
/// Tracing started and then failed.
const EXIT_FAILED: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line says what is wrong; the rest is usage.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("bad arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{PREFIX}{ERROR}{first} (see tcprst --help)");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    init_logging(cli.verbose);
    match cli.command {
        Command::Trace(args) => trace_command(*args),
        Command::Snapshot(args) => snapshot_command(args),
        Command::Doctor(args) => doctor_command(args),
        Command::Correlate(args) => correlate_command(args),
        Command::Completions { shell } => {
            let script = args::completions(shell);
            match std::io::stdout().lock().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.into(), EXIT_FAILED),
            }
        }
        Command::Man { dir } => match args::write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(
                &anyhow::Error::new(e).context(format!("writing man pages into {}", dir.display())),
                EXIT_FAILED,
            ),
        },
    }
}

fn correlate_command(args: CorrelateArgs) -> ExitCode {
    let read = || -> Result<Vec<correlate::Witness>> {
        if args.files.is_empty() {
            let text = std::io::read_to_string(std::io::stdin())?;
            return correlate::read("stdin", &text);
        }
        let mut all = Vec::new();
        for path in &args.files {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            all.extend(correlate::read(&name, &text)?);
        }
        Ok(all)
    };
    let witnesses = match read() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{PREFIX}{ERROR}{e:#}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let pairs = correlate::pair(&witnesses);
    let mut out = std::io::stdout().lock();
    for pair in &pairs {
        if writeln!(out, "{}", correlate::describe(pair)).is_err() {
            return ExitCode::SUCCESS;
        }
    }
    let explained = pairs.iter().filter(|p| p.sent.is_some()).count();
    eprintln!(
        "{PREFIX}{} received resets: {explained} paired with their send, {} sent by none of these nodes",
        pairs.len(),
        pairs.len() - explained
    );
    ExitCode::SUCCESS
}

fn snapshot_command(args: SnapshotArgs) -> ExitCode {
    let opts = match options::snapshot_options(&args) {
        Ok(opts) => opts,
        Err(e) => return fail(&e, EXIT_UNUSABLE),
    };
    match snapshot::run(&opts, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, EXIT_FAILED),
    }
}

fn doctor_command(args: DoctorArgs) -> ExitCode {
    let report = doctor::examine(&args.kernel.btf, &AttachRequest::new(&args.kernel.attach));
    let output = options::output_format(args.output);
    if let Err(e) = report.write(output, &mut std::io::stdout().lock()) {
        return fail(&e, EXIT_FAILED);
    }
    if report.can_trace() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNUSABLE)
    }
}

fn trace_command(args: TraceArgs) -> ExitCode {
    let opts = match options::trace_options(args) {
        Ok(opts) => opts,
        Err(e) => return fail(&e, EXIT_UNUSABLE),
    };
    let probes = match trace::start(&opts) {
        Ok(probes) => probes,
        Err(e) => return fail(&e, EXIT_UNUSABLE),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into(), EXIT_FAILED),
    };
    match runtime.block_on(trace::run(probes, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, EXIT_FAILED),
    }
}

fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    // One line: the context chain joined with ": ".
    eprintln!("{PREFIX}{ERROR}{e:#}");
    ExitCode::from(code)
}

/// Logs go to stderr, one line each, prefixed so they stand out from events.
/// `-v` adds tcprst's details (not its dependencies'); TCPRST_LOG overrides.
fn init_logging(verbose: u8) {
    let ours = match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("tcprst", ours)
        // kube logs every failed retry as an error; k8s.rs reports an
        // unreachable API once instead. TCPRST_LOG can still turn it on.
        .filter_module("kube", log::LevelFilter::Off)
        .parse_env("TCPRST_LOG")
        // Only what needs attention is labelled; -v's details read as the
        // lines around them do.
        .format(|buf, record| match record.level() {
            log::Level::Info | log::Level::Debug | log::Level::Trace => {
                writeln!(buf, "{PREFIX}{}", record.args())
            }
            level => writeln!(
                buf,
                "{PREFIX}{}: {}",
                level.as_str().to_lowercase(),
                record.args()
            ),
        })
        .init();
}
