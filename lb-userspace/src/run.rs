//! `lb run`: load the data path, then keep the maps equal to the manifests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::convert;
use crate::datapath::Datapath;
use crate::manifests::ManifestStore;
use crate::maps::BpfMaps;
use crate::reconcile::Reconciler;

pub struct RunOptions {
    pub manifests: PathBuf,
    pub interfaces: Vec<String>,
    pub bpf_dir: PathBuf,
}

/// How long to wait after a file event for the rest of a burst (an editor's write + rename).
const COALESCE: Duration = Duration::from_millis(20);

fn sync(store: &mut ManifestStore, options: &RunOptions, reconciler: &mut Reconciler<BpfMaps>) {
    let started = Instant::now();
    match store.reload(&options.manifests) {
        Ok(errors) => errors.iter().for_each(|error| tracing::error!("{error}")),
        Err(error) => {
            // The directory itself is unreadable: keep serving what is programmed.
            tracing::error!("{error}; keeping the current state");
            return;
        }
    }
    let (desired, errors) = convert::desired_state(&store.services(), &store.endpoint_slices());
    errors.iter().for_each(|error| tracing::error!("{error}"));
    let report = reconciler.reconcile(&desired);
    report.errors.iter().for_each(|error| tracing::error!("{error}"));
    let level_info = report.programmed + report.removed + report.errors.len() > 0;
    macro_rules! synced {
        ($level:ident) => {
            tracing::$level!(
                frontends = desired.frontends.len(),
                programmed = report.programmed,
                removed = report.removed,
                unchanged = report.unchanged,
                errors = report.errors.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            )
        };
    }
    if level_info { synced!(info) } else { synced!(debug) }
}

/// Forwards the data path's aya-log records (rare: they report inconsistencies) to our log.
fn forward_datapath_logs(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => return tracing::warn!(%error, "data-path log records will not be shown"),
    };
    let mut logger = match tokio::io::unix::AsyncFd::with_interest(logger, tokio::io::Interest::READABLE) {
        Ok(logger) => logger,
        Err(error) => return tracing::warn!(%error, "data-path log records will not be shown"),
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

pub async fn run(options: RunOptions) -> Result<()> {
    if !options.manifests.is_dir() {
        anyhow::bail!(
            "manifest directory {} does not exist or is not a directory",
            options.manifests.display()
        );
    }
    let mut datapath = Datapath::load(&options.bpf_dir)?;
    for interface in &options.interfaces {
        datapath.attach(interface)?;
        tracing::info!(%interface, "attached to ingress");
    }
    forward_datapath_logs(datapath.ebpf_mut());
    let maps = BpfMaps::from_ebpf(datapath.ebpf_mut())?;
    let mut reconciler = Reconciler::restore(maps).context("reading the pinned maps")?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads raise access events; only changes to the directory's files count.
        let changed = match event {
            Ok(event) => !matches!(event.kind, notify::EventKind::Access(_)),
            Err(_) => true, // e.g. an inotify queue overflow: re-read to be safe
        };
        if changed {
            let _ = events_tx.send(());
        }
    })
    .context("starting the manifest watcher")?;
    watcher
        .watch(&options.manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", options.manifests.display()))?;

    let mut store = ManifestStore::default();
    sync(&mut store, &options, &mut reconciler);
    match reconciler.prune() {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "pruned map entries left by an earlier run"),
        Err(error) => tracing::warn!("{error}"),
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(()) = events.recv() => {
                tokio::time::sleep(COALESCE).await;
                while events.try_recv().is_ok() {}
                sync(&mut store, &options, &mut reconciler);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("shutting down: detaching programs (maps stay pinned for the next start)");
    datapath.detach_all();
    Ok(())
}
