//! Parsing and printing for humans: sizes ("4GiB"), durations ("120s"),
//! aligned tables and a self-drawn progress line.

use std::io::Write as _;
use std::time::Duration;

use proto::BLOCK_SIZE_BYTES;

use crate::error::CliError;

/// Parses "4GiB", "512MiB", "4096" (bytes), "1T"; binary units only
/// (K/KiB, M/MiB, G/GiB, T/TiB; case-insensitive; an optional "B").
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "{text:?} is not a size (examples: 4GiB, 512MiB, 4096)"
        ));
    }
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "ki" => 10,
        "m" | "mib" | "mi" => 20,
        "g" | "gib" | "gi" => 30,
        "t" | "tib" | "ti" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB or plain bytes)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// A volume or partition size: a positive multiple of 4096 bytes.
pub fn parse_block_size(flag: &str, text: &str) -> Result<u64, CliError> {
    let bytes = parse_size(text).map_err(|e| CliError::Usage(format!("{flag}: {e}")))?;
    if bytes == 0 {
        return Err(CliError::Usage(format!(
            "{flag} {text}: size must be positive"
        )));
    }
    if bytes % BLOCK_SIZE_BYTES != 0 {
        return Err(CliError::Usage(format!(
            "{flag} {text}: {bytes} bytes is not a multiple of {BLOCK_SIZE_BYTES}"
        )));
    }
    Ok(bytes)
}

/// Parses "120s", "2m", "500ms", "1h", or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 120s, 2m, 500ms)"))?;
    let duration = match unit.trim() {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    if duration.is_zero() {
        return Err(format!("{text:?}: must be positive"));
    }
    Ok(duration)
}

/// "4.0 GiB", "512.0 MiB", "4096 B".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Columns aligned to the widest cell, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                let width = widths.get(i).copied().unwrap_or(0);
                if i + 1 == line.len() {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<width$}  "));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `[#####.....] 3/6 label`, the bar `width` characters wide.
pub fn progress_line(done: u64, total: u64, width: usize, label: &str) -> String {
    let filled = done
        .min(total)
        .saturating_mul(width as u64)
        .checked_div(total)
        .map_or(width, |f| usize::try_from(f).unwrap_or(width));
    format!(
        "[{}{}] {done}/{total} {label}",
        "#".repeat(filled),
        ".".repeat(width.saturating_sub(filled))
    )
}

/// Redraws the progress line in place on stderr (`\r`, no newline) when
/// stderr is a terminal; otherwise (logs, pipes) prints a line only when
/// the progress changes.
pub fn draw_progress(done: u64, total: u64, label: &str) {
    use std::io::IsTerminal as _;
    static LAST: std::sync::Mutex<Option<(u64, u64, String)>> = std::sync::Mutex::new(None);
    let mut err = std::io::stderr();
    let line = progress_line(done, total, 30, label);
    if err.is_terminal() {
        let _ = write!(err, "\r{line}\x1b[K");
    } else {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Some((done, total, label.to_owned()));
        if *last == now {
            return;
        }
        *last = now;
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
}

/// Ends a progress line drawn in place (a newline on a terminal).
pub fn end_progress() {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1 g"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("4GB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184TiB").is_err());
        assert!(parse_block_size("--size", "0").is_err());
        assert!(parse_block_size("--size", "4097").is_err());
        assert_eq!(parse_block_size("--size", "8KiB").ok(), Some(8192));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn rendering() {
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(progress_line(3, 6, 10, "x"), "[#####.....] 3/6 x");
        assert_eq!(progress_line(0, 0, 4, ""), "[####] 0/0 ");
        let mut table = Table::new(&["A", "LONGER"]);
        table.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(table.render(), "A    LONGER\nxyz  1\n");
    }
}
