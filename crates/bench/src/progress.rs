//! Progress bars for long work (model loading and writing, benchmarks). They draw only when
//! stderr is a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` items.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A bar counting `total` bytes.
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The model of preset `name` under `cache_dir`, made on first use with a bar.
pub fn preset_model(cache_dir: &std::path::Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let pb = bytes_bar(0, "making model");
    let announced = std::cell::Cell::new(false);
    let dir = openinfer_engine::make_model::ensure_preset(cache_dir, name, &|done, total| {
        // Called only when the model is being made, not when it is already there.
        if !announced.replace(true) {
            tracing::info!(dir = %cache_dir.join(name).display(), preset = name, "making the `{name}` demo model (random weights)");
        }
        pb.set_length(total);
        pb.set_position(done);
    })
    .with_context(|| format!("cannot make the `{name}` model under {}", cache_dir.display()))?;
    pb.finish_and_clear();
    Ok(dir)
}
