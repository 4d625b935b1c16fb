//! PNG plots of a report: each mode's rate as a ratio to `direct`, per workload and Service
//! count, and the program cost beside the empty program's. Text uses the DejaVu Sans font from
//! Debian's fonts-dejavu-core (installed by `cargo xtask bench`).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use super::datapath::{MODES, WORKLOADS};
use super::report::Report;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 4] =
    [RGBColor(120, 120, 120), RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(255, 127, 14)];

fn register_font() -> Result<()> {
    let bytes =
        std::fs::read(FONT).with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing a plot: {error:?}")
}

/// Writes `<stem>-datapath.png` and `<stem>-program.png` into `dir`.
pub fn write(report: &Report, dir: &Path, stem: &str) -> Result<()> {
    register_font()?;
    let sizes = &report.plan.datapath_sizes;
    let path = dir.join(format!("{stem}-datapath.png"));
    let root = BitMapBackend::new(&path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let slots = (sizes.len() * (MODES.len() + 1)) as f64;
    for (area, workload) in root.split_evenly((2, 2)).iter().zip(WORKLOADS) {
        let highest = report
            .datapath
            .cells
            .iter()
            .filter(|c| c.workload == workload)
            .filter_map(|c| {
                let direct = report
                    .datapath
                    .cells
                    .iter()
                    .find(|d| d.workload == workload && d.services == c.services && d.mode == "direct")?;
                Some(c.rate / direct.rate)
            })
            .fold(1.2f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{workload}: rate vs direct"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..slots, 0f64..highest * 1.45)
            .map_err(plot_error)?;
        let per = (MODES.len() + 1) as f64;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(slots as usize + 1)
            .x_label_formatter(&|x| {
                let group = (x / per).floor() as usize;
                // One tick per slot: label the group under its middle slot.
                let centered = (x - group as f64 * per).floor() as usize == MODES.len() / 2;
                match sizes.get(group) {
                    Some(n) if centered => format!("{n} Services"),
                    _ => String::new(),
                }
            })
            .y_desc("x direct")
            .draw()
            .map_err(plot_error)?;
        for (m, mode) in MODES.iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = sizes
                .iter()
                .enumerate()
                .filter_map(|(g, n)| {
                    let find = |mode: &str| {
                        report
                            .datapath
                            .cells
                            .iter()
                            .find(|c| c.services == *n && c.mode == mode && c.workload == workload)
                    };
                    let ratio = find(mode)?.rate / find("direct")?.rate;
                    let x = g as f64 * per + m as f64 + 0.5;
                    Some(Rectangle::new([(x, 0.0), (x + 0.9, ratio)], COLORS[m].filled()))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(plot_error)?
                .label(*mode)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], COLORS[m].filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;

    let costs = &report.program_cost;
    if costs.is_empty() {
        return Ok(());
    }
    let path = dir.join(format!("{stem}-program.png"));
    let root = BitMapBackend::new(&path, (1100, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let highest = costs.iter().map(|c| c.lb_ns).fold(0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("per-packet cost, BPF_PROG_TEST_RUN (ns, median)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..(costs.len() * 3) as f64, 0f64..highest * 1.4)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(costs.len() * 3 + 1)
        .x_label_formatter(&|x| {
            // One tick per slot: label each fixture under the slot between its two bars.
            let i = (x / 3.0).floor() as usize;
            match costs.get(i) {
                Some(c) if (x - i as f64 * 3.0).floor() as usize == 1 => {
                    c.fixture.split(" (").next().unwrap_or("").to_string()
                }
                _ => String::new(),
            }
        })
        .y_desc("ns")
        .draw()
        .map_err(plot_error)?;
    for (series, color, value) in [
        ("lb_ingress", COLORS[1], (|c: &super::program::ProgramCost| c.lb_ns) as fn(&_) -> f64),
        ("empty program", COLORS[0], |c| c.empty_ns),
    ] {
        let offset = if series == "lb_ingress" { 0.2 } else { 1.1 };
        chart
            .draw_series(costs.iter().enumerate().map(|(i, c)| {
                let x = i as f64 * 3.0 + offset;
                Rectangle::new([(x, 0.0), (x + 0.85, value(c))], color.filled())
            }))
            .map_err(plot_error)?
            .label(series)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
