//! Pictures of build runs for `nix-tier report`: a recorded run (from the build history) or a
//! predicted one (`nix_tier_model::simulate`) drawn as a self-contained SVG. Pure: builds in,
//! SVG text out; the command reads and writes the files.
//!
//! The picture has one row per build slot (each build goes to the lowest row free when it
//! starts, so there are as many rows as builds ran at once at most), a bar per build coloured
//! by its tier, above it a thin pale bar for its wait (from when it was ready, or first asked
//! about, to its start), and below the rows the memory in use over time: the peaks of the
//! running builds added up, the reservations added up where known, and the memory budget.

use std::fmt::Write;

use nix_tier_model::simulate::{Job, Outcome as Predicted, Prediction};
use nix_tier_model::tiers::TierTable;
use nix_tier_model::Tier;

use crate::history::{BuildRecord, Outcome as Recorded};

/// Builds further apart than this belong to different runs (see [`newest_run`]).
pub const RUN_GAP_MS: u64 = 60_000;

/// A build run to draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRun {
    /// The heading.
    pub title: String,
    /// The line under it: what was drawn, from where.
    pub subtitle: String,
    /// The builds that ran.
    pub bars: Vec<Bar>,
    /// The memory the builds may use, MiB: the line on the memory chart.
    pub budget_mib: u64,
    /// The tiers' limits for the legend, when nix-tier admitted the builds.
    pub tiers: Option<TierTable>,
}

/// One build's run, in milliseconds from the start of the picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    /// The derivation's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// When it was ready to build (a recorded build: when the hook was first asked about it);
    /// `None` when not known.
    pub ready_ms: Option<u64>,
    /// When it started (a recorded build: its admission).
    pub start_ms: u64,
    /// When it ended.
    pub end_ms: u64,
    /// Its memory peak, MiB, when known.
    pub peak_mib: Option<u64>,
    /// The memory reserved for it (its limit), MiB, when known.
    pub reserved_mib: Option<u64>,
    /// How it ended, for people.
    pub outcome: String,
    /// Whether it failed or was killed.
    pub failed: bool,
}

impl Bar {
    /// How long it waited to start, when that is known and not nothing.
    fn waited_ms(&self) -> Option<u64> {
        self.ready_ms.map(|ready| self.start_ms.saturating_sub(ready)).filter(|w| *w > 0)
    }
}

/// The newest run of `records` (oldest first, as [`crate::history::History::rows_since`] reads
/// them): the builds that chain back from the newest one, each starting less than
/// [`RUN_GAP_MS`] after every earlier one of the run ended.
pub fn newest_run(records: &[BuildRecord]) -> &[BuildRecord] {
    let mut first = 0;
    let mut ended = None;
    for (index, record) in records.iter().enumerate() {
        if ended.is_some_and(|end: u64| record.started_unix_ms > end.saturating_add(RUN_GAP_MS)) {
            first = index;
        }
        ended = Some(ended.map_or(lease_end(record), |e: u64| e.max(lease_end(record))));
    }
    &records[first..]
}

/// When a recorded build's lease ended, milliseconds since the epoch: it held its slot and its
/// memory until then (Nix registers its outputs a moment longer). Rows from before leases were
/// recorded end when Nix released their locks.
fn lease_end(record: &BuildRecord) -> u64 {
    record.started_unix_ms.saturating_add(record.leased_ms.unwrap_or(record.wall_ms))
}

/// The bars of recorded builds, from their admission to the end of their lease, and the time
/// they start from (milliseconds since the epoch):
/// the first moment one of them was asked about or started.
pub fn recorded_bars(records: &[BuildRecord]) -> (u64, Vec<Bar>) {
    let asked = |r: &BuildRecord| r.started_unix_ms.saturating_sub(r.waited_ms.unwrap_or(0));
    let origin = records.iter().map(asked).min().unwrap_or(0);
    let bars = records
        .iter()
        .map(|r| Bar {
            name: format!("{}{}{}", r.package, if r.version.is_empty() { "" } else { "-" }, r.version),
            tier: r.tier,
            ready_ms: r.waited_ms.map(|_| asked(r) - origin),
            start_ms: r.started_unix_ms - origin,
            end_ms: lease_end(r) - origin,
            peak_mib: r.peak_mib,
            reserved_mib: r.limit_mib,
            outcome: r.outcome.to_string(),
            failed: r.outcome != Recorded::Succeeded,
        })
        .collect();
    (origin, bars)
}

/// The bars of a prediction: one per job that started (a job whose dependency failed has none).
pub fn predicted_bars(jobs: &[Job], prediction: &Prediction) -> Vec<Bar> {
    jobs.iter()
        .zip(&prediction.runs)
        .filter_map(|(job, run)| {
            let start_ms = run.start_ms?;
            Some(Bar {
                name: job.name.clone(),
                tier: job.tier,
                ready_ms: run.ready_ms,
                start_ms,
                end_ms: run.end_ms.unwrap_or(start_ms),
                peak_mib: Some(job.peak_mib),
                reserved_mib: run.reserved_mib,
                outcome: run.outcome.to_string(),
                failed: run.outcome != Predicted::Built,
            })
        })
        .collect()
}

/// The row of each bar: the lowest row whose builds have all ended when it starts (interval
/// partitioning, so there are as many rows as builds ran at once at most); and the row count.
pub fn rows(bars: &[Bar]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..bars.len()).collect();
    order.sort_by_key(|&i| (bars[i].start_ms, i));
    let mut free_from: Vec<u64> = Vec::new();
    let mut row_of = vec![0; bars.len()];
    for i in order {
        let bar = &bars[i];
        let row = match free_from.iter().position(|&free| free <= bar.start_ms) {
            Some(row) => row,
            None => {
                free_from.push(0);
                free_from.len() - 1
            }
        };
        free_from[row] = bar.end_ms.max(bar.start_ms);
        row_of[i] = row;
    }
    (row_of, free_from.len())
}

/// `1 h 05 min`, `4 min 10 s`, `12.3 s`, `850 ms`.
pub fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        3600.. => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
        60.. => format!("{} min {:02} s", secs / 60, secs % 60),
        _ if ms < 1000 => format!("{ms} ms"),
        _ => format!("{:.1} s", ms as f64 / 1000.0),
    }
}

/// The picture's width, pixels.
const WIDTH: f64 = 960.0;
/// Left of the plots: the rows' names and the memory axis.
const LEFT: f64 = 72.0;
/// Right of the plots: the budget's label.
const RIGHT: f64 = 24.0;
/// One build slot: a gap, the lane of the waits, the bar, a gap.
const ROW: f64 = 32.0;
const WAIT_TOP: f64 = 4.0;
const WAIT_HEIGHT: f64 = 5.0;
const BAR_TOP: f64 = 11.0;
const BAR_HEIGHT: f64 = 18.0;
/// The memory chart's height.
const MEMORY_HEIGHT: f64 = 150.0;
/// The width of a character of the 11 px sans-serif labels, at most (to decide what fits).
const CHAR_WIDTH: f64 = 6.4;

/// The tier's colour (Okabe and Ito's palette, told apart with any colour vision; black text
/// reads on each).
fn colour(tier: Tier) -> &'static str {
    match tier {
        Tier::Heavy => "#d55e00",
        Tier::Medium => "#e69f00",
        Tier::Light => "#56b4e9",
    }
}

/// Draws `run` as a self-contained SVG document.
pub fn svg(run: &BuildRun) -> String {
    let (row_of, row_count) = rows(&run.bars);
    let span = run.bars.iter().map(|b| b.end_ms.max(b.start_ms)).max().unwrap_or(0).max(1);
    let plot = WIDTH - LEFT - RIGHT;
    let x = |ms: u64| LEFT + plot * ms as f64 / span as f64;
    let ticks = time_ticks(span);

    // The subtitle and the legend take the lines they need: the rows start below them.
    let subtitle = wrap(&run.subtitle, ((WIDTH - LEFT - RIGHT) / CHAR_WIDTH) as usize);
    let legend_top = 48.0 + 16.0 * subtitle.len() as f64;
    let mut legend_svg = String::new();
    let rows_top = legend(&mut legend_svg, run, legend_top) + 16.0;
    let rows_bottom = rows_top + ROW * row_count.max(1) as f64;
    let memory_top = rows_bottom + 64.0;
    let memory_bottom = memory_top + MEMORY_HEIGHT;
    let height = memory_bottom + 32.0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Verdana, sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(&run.title));
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(out, r##"<text x="{LEFT}" y="24" font-size="16" font-weight="bold" fill="#111">{}</text>"##, escape(&run.title));
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(out, r##"<text x="{LEFT}" y="{}" fill="#444">{}</text>"##, 44 + 16 * i, escape(line));
    }
    out += &legend_svg;

    // The build slots.
    for row in 0..row_count {
        let top = rows_top + ROW * row as f64;
        let fill = if row % 2 == 0 { "#ebebeb" } else { "#f8f8f8" };
        let _ = writeln!(out, r#"<rect class="slot" x="{LEFT}" y="{top}" width="{plot}" height="{ROW}" fill="{fill}"/>"#);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">slot {}</text>"##,
            LEFT - 8.0,
            top + BAR_TOP + BAR_HEIGHT - 5.0,
            row + 1
        );
    }
    grid(&mut out, &ticks, &x, rows_top, rows_bottom);
    for (bar, &row) in run.bars.iter().zip(&row_of) {
        let top = rows_top + ROW * row as f64;
        let tooltip = escape(&tooltip(bar));
        if let (Some(ready), Some(_)) = (bar.ready_ms, bar.waited_ms()) {
            let _ = writeln!(
                out,
                r#"<rect class="wait {tier}" x="{:.2}" y="{:.1}" width="{:.2}" height="{WAIT_HEIGHT}" fill="{}" fill-opacity="0.4"><title>{tooltip}</title></rect>"#,
                x(ready),
                top + WAIT_TOP,
                (x(bar.start_ms) - x(ready)).max(1.0),
                colour(bar.tier),
                tier = bar.tier,
            );
        }
        let (left, width) = (x(bar.start_ms), (x(bar.end_ms) - x(bar.start_ms)).max(1.0));
        // A failed build is outlined; the others have a thin white edge, so that bars end to end
        // stay apart.
        let (failed, stroke, stroke_width) = if bar.failed { (" failed", "#000", 2) } else { ("", "#fff", 1) };
        let _ = writeln!(
            out,
            r#"<rect class="build {tier}{failed}" x="{left:.2}" y="{:.1}" width="{width:.2}" height="{BAR_HEIGHT}" fill="{}" stroke="{stroke}" stroke-width="{stroke_width}"><title>{tooltip}</title></rect>"#,
            top + BAR_TOP,
            colour(bar.tier),
            tier = bar.tier,
        );
        let label = if bar.failed { format!("✗ {}", bar.name) } else { bar.name.clone() };
        if let Some(label) = shortened(&label, ((width - 6.0) / CHAR_WIDTH) as usize) {
            let _ = writeln!(
                out,
                r##"<text x="{:.2}" y="{:.1}" fill="#111" pointer-events="none">{}</text>"##,
                left + 3.0,
                top + BAR_TOP + BAR_HEIGHT - 5.0,
                escape(&label)
            );
        }
    }
    time_axis(&mut out, &ticks, &x, rows_bottom);

    memory_chart(&mut out, run, &x, span, memory_top, memory_bottom);
    grid(&mut out, &ticks, &x, memory_top, memory_bottom);
    time_axis(&mut out, &ticks, &x, memory_bottom);
    out.push_str("</svg>\n");
    out
}

/// What a bar's tooltip says.
fn tooltip(bar: &Bar) -> String {
    let mut text = format!("{} ({})\n", bar.name, bar.tier);
    if let Some(waited) = bar.waited_ms() {
        text += &format!("waited {}, ", duration(waited));
    }
    text += &format!("started at {}, ran {}", duration(bar.start_ms), duration(bar.end_ms.saturating_sub(bar.start_ms)));
    let mib = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), |v| format!("{v} MiB"));
    text += &format!("\npeak {}, reserved {}; {}", mib(bar.peak_mib), mib(bar.reserved_mib), bar.outcome);
    text
}

/// A legend's entry: its swatch, drawn at a left edge, and its text.
type Key = (Box<dyn Fn(f64, f64) -> String>, String);

/// Legend entries from the baseline `y` on, in as many lines as they need; the last line's
/// baseline.
fn keys(out: &mut String, mut y: f64, entries: Vec<Key>) -> f64 {
    let mut at = LEFT;
    for (swatch, text) in entries {
        let width = 24.0 + text.chars().count() as f64 * CHAR_WIDTH;
        if at > LEFT && at + width > WIDTH - RIGHT {
            (at, y) = (LEFT, y + 18.0);
        }
        let _ = writeln!(out, "{}", swatch(at, y));
        let _ = writeln!(out, r##"<text x="{:.1}" y="{y:.1}" fill="#222">{}</text>"##, at + 24.0, escape(&text));
        at += width + 18.0;
    }
    y
}

/// The legend from the baseline `y` on: the tiers with their limits, the wait, a failed build;
/// its last line's baseline.
fn legend(out: &mut String, run: &BuildRun, y: f64) -> f64 {
    let mut entries: Vec<Key> = Tier::ALL
        .into_iter()
        .map(|tier| {
            let text = match &run.tiers {
                Some(tiers) => {
                    let limits = tiers.get(tier);
                    format!("{tier}: {} at once, {} MiB", limits.max_jobs, limits.memory_mib)
                }
                None => tier.to_string(),
            };
            let swatch = move |at: f64, y: f64| format!(r#"<rect x="{at:.1}" y="{:.1}" width="18" height="12" fill="{}"/>"#, y - 10.0, colour(tier));
            (Box::new(swatch) as Box<dyn Fn(f64, f64) -> String>, text)
        })
        .collect();
    let wait = |at: f64, y: f64| format!(r##"<rect x="{at:.1}" y="{:.1}" width="18" height="{WAIT_HEIGHT}" fill="#888" fill-opacity="0.4"/>"##, y - 10.0);
    entries.push((Box::new(wait), "waiting to start".to_string()));
    let failed =
        |at: f64, y: f64| format!(r##"<rect x="{at:.1}" y="{:.1}" width="18" height="12" fill="#ccc" stroke="#000" stroke-width="2"/>"##, y - 10.0);
    entries.push((Box::new(failed), "✗ failed or killed".to_string()));
    keys(out, y, entries)
}

/// Faint vertical lines at the ticks, from `top` to `bottom`.
fn grid(out: &mut String, ticks: &[u64], x: &dyn Fn(u64) -> f64, top: f64, bottom: f64) {
    for &tick in ticks {
        let _ = writeln!(out, r##"<line x1="{0:.2}" y1="{top}" x2="{0:.2}" y2="{bottom}" stroke="#000" stroke-opacity="0.12"/>"##, x(tick));
    }
}

/// The time axis along `y`: a line, ticks and their labels.
fn time_axis(out: &mut String, ticks: &[u64], x: &dyn Fn(u64) -> f64, y: f64) {
    let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{y}" x2="{:.1}" y2="{y}" stroke="#444"/>"##, WIDTH - RIGHT);
    for &tick in ticks {
        let _ = writeln!(out, r##"<line x1="{0:.2}" y1="{y}" x2="{0:.2}" y2="{1}" stroke="#444"/>"##, x(tick), y + 4.0);
        let _ = writeln!(
            out,
            r##"<text x="{:.2}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            x(tick),
            y + 16.0,
            tick_label(tick)
        );
    }
}

/// The memory chart: held (the peaks of the running builds) as a filled step chart, reserved
/// as a dashed step line, the budget as a red line.
fn memory_chart(out: &mut String, run: &BuildRun, x: &dyn Fn(u64) -> f64, span: u64, top: f64, bottom: f64) {
    let steps = memory_steps(&run.bars);
    let reserved_known = run.bars.iter().any(|b| b.reserved_mib.is_some());
    let unmeasured = run.bars.iter().filter(|b| b.peak_mib.is_none()).count();
    let most = steps.iter().map(|s| s.held_mib.max(s.reserved_mib)).max().unwrap_or(0);
    let top_mib = nice_ceiling(most.max(run.budget_mib).max(1) * 11 / 10);
    let y = |mib: u64| bottom - (bottom - top) * mib as f64 / top_mib as f64;

    let mut heading = "memory: the running builds, each at its peak".to_string();
    if unmeasured > 0 {
        heading += &format!(" ({unmeasured} builds without a measured peak count as 0)");
    }
    let _ = writeln!(out, r##"<text x="{LEFT}" y="{:.1}" font-weight="bold" fill="#222">{}</text>"##, top - 30.0, escape(&heading));
    let held = |at: f64, y: f64| {
        format!(r##"<rect x="{at:.1}" y="{:.1}" width="18" height="9" fill="#0072b2" fill-opacity="0.35" stroke="#0072b2"/>"##, y - 8.5)
    };
    let mut entries: Vec<Key> = vec![(Box::new(held), "held".to_string())];
    if reserved_known {
        let reserved = |at: f64, y: f64| {
            format!(r##"<line x1="{at:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#333" stroke-width="1.5" stroke-dasharray="5 3"/>"##, y - 4.0, at + 18.0)
        };
        entries.push((Box::new(reserved), "reserved (the builds' limits)".to_string()));
    }
    let budget = |at: f64, y: f64| format!(r##"<line x1="{at:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#c00" stroke-width="2"/>"##, y - 4.0, at + 18.0);
    entries.push((Box::new(budget), "budget".to_string()));
    keys(out, top - 12.0, entries);

    // The memory axis.
    let step = nice_ceiling(top_mib / 4).max(1);
    let mut mib = 0;
    while mib <= top_mib {
        let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#000" stroke-opacity="0.12"/>"##, y(mib), WIDTH - RIGHT);
        let _ = writeln!(out, r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{mib} MiB</text>"##, LEFT - 6.0, y(mib) + 4.0);
        mib += step;
    }
    let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#444"/>"##);

    let path = |value: &dyn Fn(&MemoryStep) -> u64| {
        let mut d = format!("M{LEFT:.2},{bottom:.1}");
        for step in &steps {
            let _ = write!(d, " H{:.2} V{:.1}", x(step.at_ms), y(value(step)));
        }
        let _ = write!(d, " H{:.2}", x(span));
        d
    };
    let _ = writeln!(
        out,
        r##"<path class="held" d="{} V{bottom:.1} Z" fill="#0072b2" fill-opacity="0.35" stroke="#0072b2"/>"##,
        path(&|s| s.held_mib)
    );
    // The reservations may reach the budget: drawn over it.
    let budget_y = y(run.budget_mib);
    let _ = writeln!(
        out,
        r##"<line class="budget" x1="{LEFT}" y1="{budget_y:.1}" x2="{:.1}" y2="{budget_y:.1}" stroke="#c00" stroke-width="2"/>"##,
        WIDTH - RIGHT
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c00">budget {} MiB</text>"##,
        WIDTH - RIGHT - 4.0,
        budget_y - 5.0,
        run.budget_mib
    );
    if reserved_known {
        let _ = writeln!(
            out,
            r##"<path class="reserved" d="{}" fill="none" stroke="#333" stroke-width="1.5" stroke-dasharray="5 3"/>"##,
            path(&|s| s.reserved_mib)
        );
    }
}

/// The memory in use from one moment on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemoryStep {
    at_ms: u64,
    /// The peaks of the builds running, added up.
    held_mib: u64,
    /// Their reservations, where known, added up.
    reserved_mib: u64,
}

/// The memory in use after each moment a build starts or ends (builds ending at a moment end
/// before those starting then start).
fn memory_steps(bars: &[Bar]) -> Vec<MemoryStep> {
    let mut changes: Vec<(u64, bool, &Bar)> = Vec::new();
    // A build that took no time holds nothing.
    for bar in bars.iter().filter(|b| b.end_ms > b.start_ms) {
        changes.push((bar.start_ms, true, bar));
        changes.push((bar.end_ms, false, bar));
    }
    changes.sort_by_key(|(at, starts, _)| (*at, *starts));
    let (mut held, mut reserved) = (0u64, 0u64);
    let mut steps: Vec<MemoryStep> = Vec::new();
    for (at_ms, starts, bar) in changes {
        let (peak, limit) = (bar.peak_mib.unwrap_or(0), bar.reserved_mib.unwrap_or(0));
        match starts {
            true => (held, reserved) = (held + peak, reserved + limit),
            false => (held, reserved) = (held - peak, reserved - limit),
        }
        let step = MemoryStep { at_ms, held_mib: held, reserved_mib: reserved };
        match steps.last_mut() {
            Some(last) if last.at_ms == at_ms => *last = step,
            _ => steps.push(step),
        }
    }
    steps
}

/// The time ticks over `span_ms`: multiples of a round step, at most ten.
fn time_ticks(span_ms: u64) -> Vec<u64> {
    const STEPS_MS: [u64; 21] = [
        100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000,
        3_600_000, 7_200_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
    ];
    let step = STEPS_MS.into_iter().find(|step| span_ms / step < 10).unwrap_or(span_ms.div_ceil(10));
    (0..=span_ms / step).map(|i| i * step).collect()
}

/// A tick's label: `500 ms`, `1.5 s`, `30 s`, `2 min`, `1 min 30 s`, `1 h`, `1 h 30 min`.
fn tick_label(ms: u64) -> String {
    let secs = ms / 1000;
    match ms {
        0 => "0".to_string(),
        _ if ms < 1000 => format!("{ms} ms"),
        _ if !ms.is_multiple_of(1000) => format!("{:.1} s", ms as f64 / 1000.0),
        _ if ms < 60_000 => format!("{secs} s"),
        _ if ms < 3_600_000 => match secs % 60 {
            0 => format!("{} min", secs / 60),
            s => format!("{} min {s} s", secs / 60),
        },
        _ => match secs % 3600 / 60 {
            0 => format!("{} h", secs / 3600),
            m => format!("{} h {m} min", secs / 3600),
        },
    }
}

/// The smallest 1, 2 or 5 × 10ⁿ at least `value`.
fn nice_ceiling(value: u64) -> u64 {
    let mut magnitude = 1u64;
    loop {
        for factor in [1, 2, 5] {
            if factor * magnitude >= value {
                return factor * magnitude;
            }
        }
        magnitude = magnitude.saturating_mul(10);
    }
}

/// `text` in lines of at most `width` characters, broken at spaces where it can be.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// `text` in at most `room` characters: whole, or cut with an ellipsis; `None` when too little
/// of it would show.
fn shortened(text: &str, room: usize) -> Option<String> {
    match text.chars().count() {
        n if n <= room => Some(text.to_string()),
        _ if room >= 5 => Some(text.chars().take(room - 1).chain(['…']).collect()),
        _ => None,
    }
}

/// `text` safe in XML text and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, tier: Tier, started_s: u64, wall_s: u64, waited_ms: Option<u64>) -> BuildRecord {
        BuildRecord {
            drv: format!("/nix/store/00000000000000000000000000000000-{name}-1.0.drv"),
            package: name.to_string(),
            version: "1.0".to_string(),
            tier,
            started_unix_ms: 1_000_000_000 + started_s * 1000,
            wall_ms: wall_s * 1000 + 50,
            leased_ms: Some(wall_s * 1000),
            cpu_ms: None,
            peak_mib: Some(100),
            limit_mib: Some(200),
            outcome: Recorded::Succeeded,
            waited_ms,
        }
    }

    fn bar(name: &str, tier: Tier, ready: Option<u64>, start: u64, end: u64) -> Bar {
        Bar {
            name: name.to_string(),
            tier,
            ready_ms: ready,
            start_ms: start,
            end_ms: end,
            peak_mib: Some(100),
            reserved_mib: Some(150),
            outcome: "built".to_string(),
            failed: false,
        }
    }

    fn run(bars: Vec<Bar>) -> BuildRun {
        BuildRun { title: "a run".into(), subtitle: "of builds".into(), bars, budget_mib: 800, tiers: None }
    }

    /// The elements of `svg` whose class starts with `class`.
    fn count(svg: &str, class: &str) -> usize {
        let document = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not XML ({e}):\n{svg}"));
        document.descendants().filter(|n| n.attribute("class").is_some_and(|c| c.split(' ').next() == Some(class))).count()
    }

    #[test]
    fn the_newest_run_chains_back_to_a_gap_of_a_minute() {
        let records = [
            record("old", Tier::Light, 0, 10, None),
            // Starts 61 s after the first ended: a new run.
            record("long", Tier::Heavy, 71, 300, None),
            record("short", Tier::Light, 72, 1, None),
            // 298 s after "short" ended, but within the long build.
            record("during", Tier::Light, 370, 10, Some(500)),
            // 59 s after "during" ended.
            record("after", Tier::Medium, 439, 5, None),
        ];
        let names = |run: &[BuildRecord]| run.iter().map(|r| r.package.clone()).collect::<Vec<_>>();
        assert_eq!(names(newest_run(&records)), ["long", "short", "during", "after"]);
        assert_eq!(names(newest_run(&records[..1])), ["old"]);
        assert!(newest_run(&[]).is_empty());
    }

    #[test]
    fn recorded_bars_start_when_the_first_build_was_asked_about() {
        let before_leases = BuildRecord { leased_ms: None, ..record("b", Tier::Heavy, 11, 1, None) };
        let records = [record("a", Tier::Light, 10, 5, Some(2000)), before_leases];
        let (origin, bars) = recorded_bars(&records);
        assert_eq!(origin, 1_000_008_000);
        assert_eq!((bars[0].ready_ms, bars[0].start_ms, bars[0].end_ms), (Some(0), 2000, 7000), "the lease");
        assert_eq!((bars[1].ready_ms, bars[1].start_ms, bars[1].end_ms), (None, 3000, 4050), "the wall time");
        assert_eq!((bars[0].name.as_str(), bars[0].reserved_mib), ("a-1.0", Some(200)));
    }

    #[test]
    fn a_prediction_draws_the_builds_that_started() {
        use nix_tier_model::simulate::{simulate, Nix, Setup};
        let job = |name: &str, peak_mib, deps: Vec<usize>| Job {
            name: name.into(),
            tier: Tier::Light,
            wall_ms: 1000,
            peak_mib,
            cpu_ms: None,
            known: None,
            deps,
        };
        // "huge" alone exceeds the machine: the OOM killer ends it and its dependent never starts.
        let jobs = [job("a", 10, vec![]), job("huge", 5000, vec![]), job("after-huge", 10, vec![1])];
        let setup = Setup { threads: 2, memory_mib: 1000, oom_kill_ms: 0, nix: Nix::with_max_jobs(2), hook: None };
        let prediction = simulate(&jobs, &setup).unwrap();
        let bars = predicted_bars(&jobs, &prediction);
        assert_eq!(bars.iter().map(|b| (b.name.as_str(), b.failed)).collect::<Vec<_>>(), [("a", false), ("huge", true)]);
        assert_eq!(bars[1].outcome, "killed by the OOM killer");
    }

    #[test]
    fn each_build_goes_to_the_lowest_free_row() {
        let bars = [
            bar("a", Tier::Light, None, 0, 10),
            bar("b", Tier::Light, None, 0, 4),
            bar("c", Tier::Light, None, 4, 6), // b's row is free at 4
            bar("d", Tier::Light, None, 5, 12), // a third row: a and c run
            bar("e", Tier::Light, None, 10, 11), // a's row again
        ];
        assert_eq!(rows(&bars), (vec![0, 1, 1, 2, 0], 3));
        assert_eq!(rows(&[]), (vec![], 0));
    }

    #[test]
    fn the_svg_has_a_bar_per_build_a_wait_per_build_that_waited_and_a_row_per_slot() {
        let mut failed = bar("broken <&\"'>", Tier::Heavy, Some(0), 1000, 3000);
        failed.failed = true;
        let bars = vec![
            failed,
            bar("waited", Tier::Medium, Some(0), 2000, 5000),
            bar("no-wait", Tier::Light, Some(1000), 1000, 2000),
            bar("unknown-wait", Tier::Light, None, 3000, 9000),
        ];
        let svg = svg(&run(bars));
        assert_eq!(count(&svg, "build"), 4);
        assert_eq!(count(&svg, "wait"), 2, "only waits longer than nothing are drawn");
        assert_eq!(count(&svg, "slot"), 2, "at most two builds ran at once");
        assert_eq!(count(&svg, "held") + count(&svg, "reserved") + count(&svg, "budget"), 3);
        let document = roxmltree::Document::parse(&svg).unwrap();
        let broken = document.descendants().find(|n| n.attribute("class") == Some("build heavy failed")).expect("the failed bar");
        let tooltip = broken.children().find(|n| n.has_tag_name("title")).and_then(|t| t.text()).unwrap();
        assert_eq!(tooltip, "broken <&\"'> (heavy)\nwaited 1.0 s, started at 1.0 s, ran 2.0 s\npeak 100 MiB, reserved 150 MiB; built");
        assert!(!svg.contains("href"), "self-contained");
    }

    #[test]
    fn an_empty_run_is_still_a_picture() {
        let svg = svg(&run(Vec::new()));
        assert_eq!((count(&svg, "build"), count(&svg, "slot")), (0, 0));
    }

    #[test]
    fn memory_adds_up_the_running_builds() {
        let mut unmeasured = bar("unmeasured", Tier::Light, None, 0, 10);
        (unmeasured.peak_mib, unmeasured.reserved_mib) = (None, None);
        let bars = [
            bar("a", Tier::Light, None, 0, 10),
            bar("b", Tier::Light, None, 5, 20),
            bar("c", Tier::Light, None, 10, 15), // starts as a ends
            bar("instant", Tier::Light, None, 12, 12),
            unmeasured,
        ];
        let steps: Vec<(u64, u64, u64)> = memory_steps(&bars).iter().map(|s| (s.at_ms, s.held_mib, s.reserved_mib)).collect();
        assert_eq!(steps, [(0, 100, 150), (5, 200, 300), (10, 200, 300), (15, 100, 150), (20, 0, 0)]);
    }

    #[test]
    fn time_ticks_are_round_and_labelled_for_people() {
        assert_eq!(time_ticks(9_000), (0..=9).map(|s| s * 1000).collect::<Vec<_>>());
        assert_eq!(time_ticks(10_000), [0, 2000, 4000, 6000, 8000, 10_000]);
        assert_eq!(time_ticks(700), [0, 100, 200, 300, 400, 500, 600, 700]);
        assert_eq!(time_ticks(3 * 3_600_000).len(), 7, "every 30 min");
        let labels = |ticks: &[u64]| ticks.iter().map(|&t| tick_label(t)).collect::<Vec<_>>();
        assert_eq!(labels(&[0, 500, 1000, 1500]), ["0", "500 ms", "1 s", "1.5 s"]);
        assert_eq!(labels(&[0, 30_000, 60_000, 90_000]), ["0", "30 s", "1 min", "1 min 30 s"]);
        assert_eq!(labels(&[0, 1_800_000, 3_600_000, 5_400_000]), ["0", "30 min", "1 h", "1 h 30 min"]);
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(250_000), "4 min 10 s");
        assert_eq!((nice_ceiling(1), nice_ceiling(3), nice_ceiling(880), nice_ceiling(1001)), (1, 5, 1000, 2000));
    }

    #[test]
    fn text_is_wrapped_and_shortened_to_fit() {
        assert_eq!(wrap("a bb ccc dddd", 6), ["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("a-much-too-long-word b", 4), ["a-much-too-long-word", "b"]);
        assert_eq!(shortened("home-environment", 16).as_deref(), Some("home-environment"));
        assert_eq!(shortened("home-environment", 9).as_deref(), Some("home-env…"));
        assert_eq!(shortened("home-environment", 4), None);
    }
}
