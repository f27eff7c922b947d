//! `tollgate-simulator`: runs the upstream simulator as a process, for the offline demo and the
//! benchmark. Faults are queued over HTTP: `POST /_sim/faults` with a fault JSON object,
//! `POST /_sim/release` to release held streams, `GET /_sim/calls` for the call count.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tollgate-simulator",
    about = "Simulated LLM upstream (OpenAI, Anthropic and Gemini wire formats)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: SocketAddr,
    /// Require this key (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic, `x-goog-api-key` for Gemini; repeat for several).
    #[arg(long)]
    api_key: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let simulator = tollgate_simulator::Simulator::start(args.listen, args.api_key).await?;
    eprintln!(
        "tollgate-simulator: SIMULATED upstreams: OpenAI on {}, Anthropic on {}, Gemini on {}",
        simulator.openai_base_url(),
        simulator.anthropic_base_url(),
        simulator.gemini_base_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
