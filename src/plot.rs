//! `lmforge plot`: training and validation loss, learning rate and rollback events of a run,
//! and for a mixture of experts the expert load at each evaluation, drawn into a PNG with no
//! plotting dependency (a raster, a 5×7 font, and an uncompressed PNG encoder are all it takes).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::train::metrics::METRICS_FILE;

const WIDTH: usize = 900;
const HEIGHT: usize = 500;
const MARGIN_LEFT: usize = 70;
const MARGIN_RIGHT: usize = 70;
const MARGIN_TOP: usize = 40;
const MARGIN_BOTTOM: usize = 50;
/// Height of the expert-load panel under the loss chart (runs of a mixture of experts).
const LOAD_PANEL: usize = 300;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [225, 225, 225];
const TRAIN: Rgb = [31, 119, 180];
const VAL: Rgb = [255, 127, 14];
const LR: Rgb = [44, 160, 44];
const EVENT: Rgb = [214, 39, 40];

/// The series of one run, read from `metrics.jsonl`.
#[derive(Default, Debug)]
pub struct RunSeries {
    pub train: Vec<(f64, f64)>,
    pub val: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    /// Steps of rollbacks and restarts.
    pub events: Vec<f64>,
    /// At each evaluation of a mixture of experts: per layer, each expert's share of the
    /// routed tokens.
    pub expert_load: Vec<(f64, Vec<Vec<f64>>)>,
}

pub fn read_series(run_dir: &Path) -> Result<RunSeries> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut series = RunSeries::default();
    for (number, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::checkpoint(&path, format!("line {}: not JSON: {e}", number + 1)))?;
        let step = v.get("step").and_then(Value::as_f64);
        let field = |name: &str| v.get(name).and_then(Value::as_f64);
        match (step, v.get("event")) {
            (Some(step), Some(_)) => series.events.push(step),
            (Some(step), None) => {
                if let Some(loss) = field("loss").filter(|l| l.is_finite()) {
                    series.train.push((step, loss));
                }
                if let Some(loss) = field("val_loss") {
                    series.val.push((step, loss));
                }
                if let Some(lr) = field("lr") {
                    series.lr.push((step, lr));
                }
                if let Some(load) = v.get("expert_load").and_then(|l| serde_json::from_value(l.clone()).ok()) {
                    series.expert_load.push((step, load));
                }
            }
            _ => {}
        }
    }
    if series.train.is_empty() && series.val.is_empty() {
        return Err(Error::checkpoint(&path, "no loss values to plot yet"));
    }
    Ok(series)
}

/// Draw the run's curves into `out` (PNG).
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<()> {
    render(&read_series(run_dir)?).write_png(out)
}

fn render(series: &RunSeries) -> Canvas {
    let load_panel = if series.expert_load.is_empty() { 0 } else { LOAD_PANEL };
    let mut canvas = Canvas::new(WIDTH, HEIGHT + load_panel);
    let all_steps = series.train.iter().chain(&series.val).map(|p| p.0);
    let (x_min, x_max) = bounds(all_steps.chain(series.events.iter().copied()));
    let (y_min, y_max) = bounds(series.train.iter().chain(&series.val).map(|p| p.1));
    let (y_min, y_max) = pad(y_min, y_max);
    let plot = Frame {
        x0: MARGIN_LEFT,
        y0: MARGIN_TOP,
        w: WIDTH - MARGIN_LEFT - MARGIN_RIGHT,
        h: HEIGHT - MARGIN_TOP - MARGIN_BOTTOM,
    };
    for i in 0..=4 {
        let y = plot.y0 + plot.h * i / 4;
        canvas.hline(plot.x0, plot.x0 + plot.w, y, GREY);
        let value = y_max - (y_max - y_min) * i as f64 / 4.0;
        canvas.text(&format!("{value:.2}"), 8, y.saturating_sub(3), BLACK);
    }
    canvas.rect(plot.x0, plot.y0, plot.w, plot.h, BLACK);
    for &step in &series.events {
        let x = plot.x(step, x_min, x_max);
        canvas.vline(x, plot.y0, plot.y0 + plot.h, EVENT);
    }
    let to_px = |(s, v): (f64, f64), lo: f64, hi: f64| (plot.x(s, x_min, x_max), plot.y(v, lo, hi));
    canvas.polyline(series.train.iter().map(|&p| to_px(p, y_min, y_max)), TRAIN);
    canvas.polyline(series.val.iter().map(|&p| to_px(p, y_min, y_max)), VAL);
    for &p in &series.val {
        let (x, y) = to_px(p, y_min, y_max);
        canvas.dot(x, y, VAL);
    }
    if !series.lr.is_empty() {
        let (lr_min, lr_max) = bounds(series.lr.iter().map(|p| p.1));
        let (lr_min, lr_max) = pad(lr_min.min(0.0), lr_max);
        canvas.polyline(series.lr.iter().map(|&p| to_px(p, lr_min, lr_max)), LR);
        canvas.text(&format!("{lr_max:.1e}"), plot.x0 + plot.w + 6, plot.y0, LR);
        canvas.text("lr", plot.x0 + plot.w + 6, plot.y0 + 12, LR);
    }
    canvas.text(&format!("{x_min:.0}"), plot.x0, plot.y0 + plot.h + 10, BLACK);
    let last = format!("{x_max:.0}");
    canvas.text(&last, plot.x0 + plot.w - 6 * last.len(), plot.y0 + plot.h + 10, BLACK);
    canvas.text("step", plot.x0 + plot.w / 2 - 12, plot.y0 + plot.h + 24, BLACK);
    let legend = [("train loss", TRAIN), ("val loss", VAL), ("lr", LR), ("rollback/restart", EVENT)];
    let mut x = plot.x0;
    for (label, color) in legend {
        canvas.fill(x, 14, 14, 8, color);
        canvas.text(label, x + 18, 14, BLACK);
        x += 18 + 6 * label.len() + 24;
    }
    if load_panel > 0 {
        let panel = Frame { x0: plot.x0, y0: HEIGHT + 30, w: plot.w, h: load_panel - 60 };
        let steps = |s: f64| plot.x(s, x_min, x_max);
        draw_expert_load(&mut canvas, &panel, &series.expert_load, steps);
    }
    canvas
}

/// A heat map of the expert load: one row per (layer, expert), one column per evaluation
/// (aligned with the loss chart's steps), coloured by the share over the uniform share —
/// blue for an idle expert, white for its fair share, red for twice it or more.
fn draw_expert_load(canvas: &mut Canvas, panel: &Frame, load: &[(f64, Vec<Vec<f64>>)], x_of: impl Fn(f64) -> usize) {
    canvas.text(
        "expert load: share of routed tokens / uniform share, per layer and expert",
        panel.x0,
        panel.y0 - 22,
        BLACK,
    );
    let rows: Vec<(usize, usize)> =
        load[0].1.iter().enumerate().flat_map(|(l, e)| (0..e.len()).map(move |x| (l, x))).collect();
    let row_h = (panel.h / rows.len().max(1)).max(1);
    let h = row_h * rows.len();
    let xs: Vec<usize> = load.iter().map(|(s, _)| x_of(*s)).collect();
    for (i, (_, shares)) in load.iter().enumerate() {
        let left = if i == 0 { xs[0] } else { (xs[i - 1] + xs[i]) / 2 };
        let right = if i + 1 == xs.len() { xs[i].max(left + 4) } else { (xs[i] + xs[i + 1]) / 2 };
        for (r, &(layer, expert)) in rows.iter().enumerate() {
            let Some(share) = shares.get(layer).and_then(|l| l.get(expert)) else { continue };
            let uniform = 1.0 / shares[layer].len() as f64;
            canvas.fill(left, panel.y0 + r * row_h, right - left, row_h, load_color(share / uniform));
        }
    }
    let experts = load[0].1.first().map_or(1, Vec::len);
    let label_every = (10 / (row_h * experts)).max(1) + 1;
    for layer in 0..load[0].1.len() {
        let y = panel.y0 + layer * experts * row_h;
        if layer > 0 {
            canvas.hline(panel.x0, panel.x0 + panel.w, y, BLACK);
        }
        if layer % label_every == 0 || label_every == 1 {
            canvas.text(&format!("l{layer}"), 30, y + (experts * row_h).saturating_sub(7) / 2, BLACK);
        }
    }
    canvas.rect(panel.x0, panel.y0, panel.w, h, BLACK);
    let legend_y = panel.y0 + h + 10;
    for i in 0..=120 {
        canvas.vline(panel.x0 + i, legend_y, legend_y + 8, load_color(i as f64 / 60.0));
    }
    canvas.text("0", panel.x0, legend_y + 12, BLACK);
    canvas.text("1", panel.x0 + 58, legend_y + 12, BLACK);
    canvas.text("2+", panel.x0 + 114, legend_y + 12, BLACK);
    canvas.text("x uniform share (1/experts)", panel.x0 + 140, legend_y, BLACK);
}

/// Blue (0) → white (1, the uniform share) → red (2 and above).
fn load_color(ratio: f64) -> Rgb {
    const BLUE: Rgb = [49, 54, 149];
    const RED: Rgb = [165, 0, 38];
    let lerp = |a: Rgb, b: Rgb, t: f64| -> Rgb {
        [0, 1, 2].map(|i| (a[i] as f64 + (b[i] as f64 - a[i] as f64) * t.clamp(0.0, 1.0)).round() as u8)
    };
    if ratio < 1.0 {
        lerp(BLUE, WHITE, ratio)
    } else {
        lerp(WHITE, RED, ratio - 1.0)
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn pad(lo: f64, hi: f64) -> (f64, f64) {
    let span = (hi - lo).max(1e-9);
    (lo - 0.05 * span, hi + 0.05 * span)
}

struct Frame {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

impl Frame {
    fn x(&self, value: f64, lo: f64, hi: f64) -> usize {
        let t = if hi > lo { (value - lo) / (hi - lo) } else { 0.5 };
        self.x0 + (t.clamp(0.0, 1.0) * self.w as f64).round() as usize
    }

    fn y(&self, value: f64, lo: f64, hi: f64) -> usize {
        let t = if hi > lo { (value - lo) / (hi - lo) } else { 0.5 };
        self.y0 + self.h - (t.clamp(0.0, 1.0) * self.h as f64).round() as usize
    }
}

/// An RGB raster.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas { width, height, pixels: vec![WHITE; width * height] }
    }

    fn set(&mut self, x: usize, y: usize, color: Rgb) {
        if x < self.width && y < self.height {
            self.pixels[y * self.width + x] = color;
        }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, color: Rgb) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, color);
            }
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, color: Rgb) {
        (x0..=x1).for_each(|x| self.set(x, y, color));
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, color: Rgb) {
        (y0..=y1).for_each(|y| self.set(x, y, color));
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, color: Rgb) {
        self.hline(x, x + w, y, color);
        self.hline(x, x + w, y + h, color);
        self.vline(x, y, y + h, color);
        self.vline(x + w, y, y + h, color);
    }

    fn dot(&mut self, x: usize, y: usize, color: Rgb) {
        self.fill(x.saturating_sub(2), y.saturating_sub(2), 5, 5, color);
    }

    /// A 2-pixel-wide line through the points (Bresenham per segment).
    fn polyline(&mut self, points: impl Iterator<Item = (usize, usize)>, color: Rgb) {
        let mut previous: Option<(usize, usize)> = None;
        for point in points {
            let from = previous.unwrap_or(point);
            let (mut x, mut y) = (from.0 as i64, from.1 as i64);
            let (x1, y1) = (point.0 as i64, point.1 as i64);
            let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
            let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
            let mut err = dx + dy;
            loop {
                self.set(x as usize, y as usize, color);
                self.set(x as usize, y as usize + 1, color);
                if x == x1 && y == y1 {
                    break;
                }
                let e2 = 2 * err;
                if e2 >= dy {
                    err += dy;
                    x += sx;
                }
                if e2 <= dx {
                    err += dx;
                    y += sy;
                }
            }
            previous = Some(point);
        }
    }

    fn text(&mut self, text: &str, x: usize, y: usize, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.set(x + 6 * i + col, y + row, color);
                    }
                }
            }
        }
    }

    /// An 8-bit RGB PNG with stored (uncompressed) deflate blocks: valid and simple.
    fn write_png(&self, path: &Path) -> Result<()> {
        let mut raw = Vec::with_capacity(self.height * (1 + 3 * self.width));
        for row in self.pixels.chunks(self.width) {
            raw.push(0); // filter: none
            raw.extend(row.iter().flatten());
        }
        let mut zlib = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            zlib.push(u8::from(i + 1 == blocks.len()));
            let len = block.len() as u16;
            zlib.extend(len.to_le_bytes());
            zlib.extend((!len).to_le_bytes());
            zlib.extend(*block);
        }
        zlib.extend(adler32(&raw).to_be_bytes());
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut header = Vec::new();
        header.extend((self.width as u32).to_be_bytes());
        header.extend((self.height as u32).to_be_bytes());
        header.extend([8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter method, no interlace
        chunk(&mut png, b"IHDR", &header);
        chunk(&mut png, b"IDAT", &zlib);
        chunk(&mut png, b"IEND", &[]);
        std::fs::write(path, png).map_err(|e| Error::io(path, e))
    }
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend((data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend(kind);
    png.extend(data);
    let crc = crc32(&png[start..]);
    png.extend(crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in bytes {
        a = (a + byte as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// 5×7 glyphs for the characters the plot writes; others render blank.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_load_is_read_and_drawn_below_the_losses() {
        let dir = crate::test_util::TempDir::new("plot");
        let lines = [
            r#"{"step":0,"val_loss":5.0,"val_ppl":148.4,"expert_load":[[0.25,0.25,0.25,0.25],[0.7,0.1,0.1,0.1]]}"#,
            r#"{"step":1,"loss":4.0,"lr":0.001,"balance_loss":1.2,"z_loss":3.1}"#,
            r#"{"step":2,"val_loss":3.0,"val_ppl":20.1,"expert_load":[[0.25,0.25,0.25,0.25],[0.4,0.2,0.2,0.2]]}"#,
        ];
        dir.write(METRICS_FILE, lines.join("\n"));
        let series = read_series(&dir.0).unwrap();
        assert_eq!(series.expert_load.len(), 2);
        assert_eq!(series.expert_load[1].1[1], vec![0.4, 0.2, 0.2, 0.2]);
        let canvas = render(&series);
        assert_eq!(canvas.height, HEIGHT + LOAD_PANEL);
        // 8 rows (2 layers × 4 experts) of 30 pixels from y = HEIGHT + 30. Layer 1's expert 0
        // took 2.8× its share at the first evaluation (red), 1.6× at the second; layer 0 is even.
        let pixel = |x: usize, y: usize| canvas.pixels[y * canvas.width + x];
        let (first, second) = (MARGIN_LEFT + 5, WIDTH - MARGIN_RIGHT - 5);
        let row = |r: usize| HEIGHT + 30 + 30 * r + 15;
        assert_eq!(pixel(first, row(4)), [165, 0, 38]);
        assert_eq!(pixel(second, row(4)), load_color(1.6));
        assert_eq!(pixel(first, row(0)), WHITE);
        assert_eq!(pixel(second, row(5)), load_color(0.8));
        plot_run(&dir.0, &dir.path("loss.png")).unwrap();
    }

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
