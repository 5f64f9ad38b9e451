//! `plumb scaling fit RUN_DIR...` fits the scaling laws to the sweeps in those run
//! directories (their `sweep.json`), prints the fit, and writes `scaling_fit.json`, a plot
//! (`scaling.png`) and the same figures to TensorBoard (`tb/scaling/`);
//! `plumb scaling plan --compute C` prints the compute-optimal model size and token count
//! for a budget from a saved fit.
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use plumb_core::checkpoint::write_file_atomically;
use plumb_host::log::TbWriter;
use plumb_host::scaling::sweep::{read_table, SweepRow};
use plumb_host::scaling::{fit_chinchilla, fit_kaplan, ChinchillaFit, Point, PowerLaw};

use crate::Failure;

#[derive(clap::Subcommand)]
pub enum Scaling {
    /// Fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al.) and Kaplan's L(N), L(D) to sweeps.
    Fit(FitArgs),
    /// The compute-optimal model size and tokens for a compute budget, from a saved fit.
    Plan(PlanArgs),
}

#[derive(clap::Args)]
pub struct FitArgs {
    /// Output directories of sweep runs (each holds the `sweep.json` a recipe with a
    /// `sweep:` section writes); their points are fitted together.
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Where `scaling_fit.json`, `scaling.png` and `tb/scaling/` go; default the first run
    /// directory.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Bootstrap resamples for the 95% intervals.
    #[arg(long, default_value_t = 200, allow_negative_numbers = true)]
    pub bootstrap: usize,
    /// Seeds the bootstrap's resampling.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The compute budget in FLOPs (C ≈ 6ND), e.g. `1e21`.
    #[arg(long, allow_negative_numbers = true)]
    pub compute: f64,
    /// A fit written by `plumb scaling fit`; default Hoffmann et al.'s published law.
    #[arg(long)]
    pub fit: Option<PathBuf>,
}

/// What `plumb scaling fit` writes, and `plumb scaling plan` reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct FitReport {
    pub chinchilla: ChinchillaFit,
    pub kaplan_n: Option<PowerLaw>,
    pub kaplan_d: Option<PowerLaw>,
    pub runs: Vec<SweepRow>,
}

pub fn run(command: &Scaling) -> Result<(), Failure> {
    match command {
        Scaling::Fit(args) => fit(args),
        Scaling::Plan(args) => plan(args),
    }
}

fn fit(args: &FitArgs) -> Result<(), Failure> {
    let mut runs = Vec::new();
    for dir in &args.run_dirs {
        runs.extend(read_table(dir).map_err(Failure::User)?);
    }
    let points: Vec<Point> = runs.iter().map(SweepRow::point).collect();
    let chinchilla = fit_chinchilla(&points, args.bootstrap, args.seed).map_err(Failure::User)?;
    let report =
        FitReport { kaplan_n: fit_kaplan(&points, true), kaplan_d: fit_kaplan(&points, false), chinchilla, runs };
    print_report(&report);

    let out = args.output.clone().unwrap_or_else(|| args.run_dirs[0].clone());
    let json = serde_json::to_string_pretty(&report).map_err(|e| Failure::Internal(e.to_string()))? + "\n";
    let fit_file = out.join("scaling_fit.json");
    write_file_atomically(&fit_file, json.as_bytes()).map_err(|e| Failure::User(e.to_string()))?;
    let png = out.join("scaling.png");
    let (width, height) = (1200, 500);
    plot(&report, &png, (width, height)).map_err(|e| Failure::Internal(format!("plotting {}: {e}", png.display())))?;
    log_tensorboard(&report, &out.join("tb/scaling"), &png, (width, height))?;
    println!("fit: {}\nplot: {}\nTensorBoard: {}", fit_file.display(), png.display(), out.join("tb/scaling").display());
    Ok(())
}

fn print_report(report: &FitReport) {
    let fit = &report.chinchilla;
    let law = &fit.law;
    let ci =
        |name: &str| fit.intervals.get(name).map(|i| format!(" [{:.4}, {:.4}]", i.low, i.high)).unwrap_or_default();
    println!(
        "L(N, D) = E + A/N^α + B/D^β over {} runs (Huber δ=1e-3 on log-residuals, L-BFGS from Hoffmann et al.'s grid):",
        fit.points
    );
    println!("  E = {:.4}{}", law.e, ci("E"));
    println!("  A = {:.4}{}", law.a, ci("A"));
    println!("  B = {:.4}{}", law.b, ci("B"));
    println!("  α = {:.4}{}", law.alpha, ci("alpha"));
    println!("  β = {:.4}{}", law.beta, ci("beta"));
    println!("  R² = {:.4} (95% intervals from {} bootstrap resamples)", fit.r_squared, fit.bootstrap_samples);
    println!(
        "  compute-optimal: N* ∝ C^{:.3}{}, D* ∝ C^{:.3}{}",
        law.beta / (law.alpha + law.beta),
        ci("n_opt_exponent"),
        law.alpha / (law.alpha + law.beta),
        ci("d_opt_exponent")
    );
    for (name, kaplan) in [("L(N) = (N_c/N)^α_N", &report.kaplan_n), ("L(D) = (D_c/D)^α_D", &report.kaplan_d)] {
        if let Some(k) = kaplan {
            println!(
                "Kaplan {name}: α = {:.4}, scale = {:.4e}, R² = {:.4} over {} frontier points",
                k.exponent, k.scale, k.r_squared, k.points
            );
        }
    }
}

fn plan(args: &PlanArgs) -> Result<(), Failure> {
    if !(args.compute.is_finite() && args.compute > 0.0) {
        return Err(Failure::User(format!("--compute: expected a positive number of FLOPs, found {}", args.compute)));
    }
    let (law, source) = match &args.fit {
        Some(file) => {
            let text = std::fs::read(file).map_err(|e| Failure::User(format!("--fit {}: {e}", file.display())))?;
            let report: FitReport = serde_json::from_slice(&text).map_err(|e| {
                Failure::User(format!("--fit {}: not a fit written by `plumb scaling fit`: {e}", file.display()))
            })?;
            (report.chinchilla.law, file.display().to_string())
        }
        None => (plumb_host::scaling::Chinchilla::HOFFMANN, "Hoffmann et al. 2022 (published fit)".to_owned()),
    };
    let (n, d) = law.compute_optimal(args.compute);
    println!("compute budget C = {:.4e} FLOPs, law from {source}:", args.compute);
    println!("  model size N* = {n:.4e} non-embedding parameters");
    println!("  tokens     D* = {d:.4e} ({:.1} tokens per parameter)", d / n);
    println!("  expected loss L(N*, D*) = {:.4}", law.loss(n, d));
    Ok(())
}

/// Loss against compute with the runs, the fitted compute-optimal frontier and, beside it,
/// the iso-FLOP curves: the fitted loss against N at a few fixed budgets, their minima
/// marked.
fn plot(report: &FitReport, path: &Path, size: (u32, u32)) -> Result<(), Box<dyn std::error::Error>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "cannot load the plot's font")?;
    let law = report.chinchilla.law;
    let runs = &report.runs;
    let (c_min, c_max) = bounds(runs.iter().map(|r| r.c));
    let (c_lo, c_hi) = (c_min / 3.0, c_max * 3.0);
    let frontier: Vec<(f64, f64)> = log_space(c_lo, c_hi, 60)
        .map(|c| {
            let (n, d) = law.compute_optimal(c);
            (c, law.loss(n, d))
        })
        .collect();
    let (l_min, l_max) = bounds(runs.iter().map(|r| r.loss).chain(frontier.iter().map(|p| p.1)));

    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(size.0 / 2);
    let mut chart = ChartBuilder::on(&left)
        .caption("loss against compute", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((c_lo..c_hi).log_scale(), (l_min * 0.97)..(l_max * 1.03))?;
    chart
        .configure_mesh()
        .x_desc("compute C = 6ND (FLOPs)")
        .y_desc("validation loss")
        .x_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(frontier.iter().copied(), RED.stroke_width(2)))?
        .label("fitted compute-optimal frontier")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    chart
        .draw_series(runs.iter().map(|r| Circle::new((r.c, r.loss), 4, BLUE.filled())))?
        .label("runs")
        .legend(|(x, y)| Circle::new((x + 8, y), 4, BLUE.filled()));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

    // Iso-FLOP curves: for a few budgets, L(N, C/6N) over N around the optimum.
    let budgets: Vec<f64> = log_space(c_min, c_max, 4).collect();
    let (n_min, n_max) = bounds(runs.iter().map(|r| r.n));
    let (n_lo, n_hi) = (n_min / 4.0, n_max * 4.0);
    let curves: Vec<Vec<(f64, f64)>> =
        budgets.iter().map(|&c| log_space(n_lo, n_hi, 60).map(|n| (n, law.loss(n, c / (6.0 * n)))).collect()).collect();
    let (iso_lo, _) = bounds(curves.iter().flatten().map(|p| p.1));
    let mut iso = ChartBuilder::on(&right)
        .caption("iso-FLOP curves of the fit", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((n_lo..n_hi).log_scale(), (iso_lo * 0.97)..(l_max * 1.15))?;
    iso.configure_mesh()
        .x_desc("non-embedding parameters N")
        .y_desc("fitted loss")
        .x_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    for (k, (curve, &c)) in curves.iter().zip(&budgets).enumerate() {
        let color = Palette99::pick(k).to_rgba();
        iso.draw_series(LineSeries::new(curve.iter().copied(), color.stroke_width(2)))?
            .label(format!("C = {c:.1e}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        let (n, d) = law.compute_optimal(c);
        iso.draw_series(std::iter::once(TriangleMarker::new((n, law.loss(n, d)), 6, color.filled())))?;
    }
    iso.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The fit's figures as TensorBoard scalars (the runs' loss by compute, the frontier) and
/// the plot as an image.
fn log_tensorboard(report: &FitReport, dir: &Path, png: &Path, (width, height): (u32, u32)) -> Result<(), Failure> {
    let tb = TbWriter::create(dir).map_err(|e| Failure::User(e.to_string()))?;
    tb.restart_at(0);
    // Steps must be integers: compute in units of its log10 ×100 keeps the order and spacing.
    let step = |c: f64| (c.log10() * 100.0).round() as i64;
    for run in &report.runs {
        tb.scalar("scaling/run_loss_by_log10_compute_x100", step(run.c), run.loss);
    }
    let law = report.chinchilla.law;
    let (c_min, c_max) = bounds(report.runs.iter().map(|r| r.c));
    for c in log_space(c_min, c_max, 20) {
        let (n, d) = law.compute_optimal(c);
        tb.scalar("scaling/frontier_loss_by_log10_compute_x100", step(c), law.loss(n, d));
        tb.scalar("scaling/frontier_log10_n_by_log10_compute_x100", step(c), n.log10());
    }
    let table = format!(
        "| E | A | B | α | β | R² |\n|---|---|---|---|---|---|\n| {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
        law.e, law.a, law.b, law.alpha, law.beta, report.chinchilla.r_squared
    );
    tb.text("scaling/fit", 0, &table);
    let bytes = std::fs::read(png).map_err(|e| Failure::User(format!("{}: {e}", png.display())))?;
    tb.image("scaling/plot", 0, bytes, height, width);
    tb.close().map_err(|e| Failure::User(e.to_string()))
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// `count` points from `lo` to `hi`, evenly spaced in log space.
fn log_space(lo: f64, hi: f64, count: usize) -> impl Iterator<Item = f64> {
    let (a, b) = (lo.ln(), hi.ln());
    let steps = count.max(2) - 1;
    (0..=steps).map(move |i| (a + (b - a) * i as f64 / steps as f64).exp())
}
