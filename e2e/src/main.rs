//! `cairn-bench`: benchmarks, each figure next to a physical reference measured in the same run.

mod cluster;
mod datanode;
mod disk_agent;
mod operator;
mod reference;

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Cairn benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One standalone datanode: PUT throughput, GET latency, volume open time.
    Datanode(datanode::Options),
    /// A local 3-node cluster (real etcd) against one node; catch-up after a node was down.
    Cluster(cluster::Options),
    /// The operator: planning and reconciles for 100 machines and 10,000 partitions.
    Operator(operator::Options),
    /// The disk agent: mountinfo scan, CreateVolume against a raw fallocate (needs root).
    DiskAgent(disk_agent::Options),
}

/// One result line.
#[derive(Debug, Serialize)]
pub struct Scenario {
    pub scenario: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub reference: Option<f64>,
    pub reference_unit: Option<&'static str>,
    /// value / reference.
    pub ratio: Option<f64>,
    /// What the reference is, and anything else worth knowing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// Lowest and highest ratio of the rounds, when Cairn and its reference were measured in
    /// interleaved rounds (the ratio above is of the medians).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_spread: Option<[f64; 2]>,
}

impl Scenario {
    pub fn new(scenario: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            scenario,
            value,
            unit,
            reference: None,
            reference_unit: None,
            ratio: None,
            note: None,
            p99: None,
            ratio_spread: None,
        }
    }

    /// Cairn and its reference measured in interleaved rounds: the medians, and the spread of
    /// the per-round ratios.
    pub fn rounds(
        scenario: &'static str,
        values: &[f64],
        unit: &'static str,
        references: &[f64],
        reference_unit: &'static str,
        note: impl Into<String>,
    ) -> Self {
        let ratios: Vec<f64> = values.iter().zip(references).map(|(v, r)| v / r).collect();
        let mut this = Self::new(scenario, median(values), unit).against(median(references), reference_unit, note);
        let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        this.ratio_spread = Some([low, high]);
        this
    }

    pub fn against(mut self, reference: f64, unit: &'static str, note: impl Into<String>) -> Self {
        self.reference = Some(reference);
        self.reference_unit = Some(unit);
        self.ratio = Some(self.value / reference);
        self.note = Some(note.into());
        self
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn report(results: &[Scenario], json: bool) {
    if json {
        for r in results {
            println!("{}", serde_json::to_string(r).expect("serializable"));
        }
        return;
    }
    println!("{:<20} {:>12} {:<8} {:>12} {:<8} {:>7}  note", "scenario", "value", "unit", "reference", "unit", "ratio");
    for r in results {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:>12} {:<8} {:>12} {:<8} {:>7}  {}{}{}",
            r.scenario,
            if r.value < 10.0 { format!("{:.3}", r.value) } else { format!("{:.2}", r.value) },
            r.unit,
            opt(r.reference),
            r.reference_unit.unwrap_or("-"),
            opt(r.ratio),
            r.note.as_deref().unwrap_or(""),
            r.p99.map(|p| format!(" (p99 {p:.2} ms)")).unwrap_or_default(),
            r.ratio_spread.map(|[low, high]| format!(" [rounds: ratio {low:.2}–{high:.2}]")).unwrap_or_default()
        );
    }
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Datanode(options) => {
            let json = options.json;
            let results = tokio::runtime::Runtime::new()?.block_on(datanode::run(options))?;
            report(&results, json);
        }
        Command::Cluster(options) => {
            let json = options.json;
            let results = tokio::runtime::Runtime::new()?.block_on(cluster::run(options))?;
            report(&results, json);
        }
        Command::Operator(options) => {
            let json = options.json;
            let results = tokio::runtime::Runtime::new()?.block_on(operator::run(options))?;
            report(&results, json);
        }
        Command::DiskAgent(options) => {
            let json = options.json;
            report(&disk_agent::run(options)?, json);
        }
    }
    Ok(())
}
