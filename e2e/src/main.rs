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
}

impl Scenario {
    pub fn new(scenario: &'static str, value: f64, unit: &'static str) -> Self {
        Self { scenario, value, unit, reference: None, reference_unit: None, ratio: None, note: None, p99: None }
    }

    pub fn against(mut self, reference: f64, unit: &'static str, note: impl Into<String>) -> Self {
        self.reference = Some(reference);
        self.reference_unit = Some(unit);
        self.ratio = Some(self.value / reference);
        self.note = Some(note.into());
        self
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
            "{:<20} {:>12} {:<8} {:>12} {:<8} {:>7}  {}{}",
            r.scenario,
            if r.value < 10.0 { format!("{:.3}", r.value) } else { format!("{:.2}", r.value) },
            r.unit,
            opt(r.reference),
            r.reference_unit.unwrap_or("-"),
            opt(r.ratio),
            r.note.as_deref().unwrap_or(""),
            r.p99.map(|p| format!(" (p99 {p:.2} ms)")).unwrap_or_default()
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
