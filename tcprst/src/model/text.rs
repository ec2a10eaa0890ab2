//! How model values read in one line of text.

use std::time::Duration;

/// "12s", "1.5s", "3m20s": short enough for one line.
pub fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
    }
}
