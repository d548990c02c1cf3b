//! The Langfuse stand-in as a process, for the end-to-end benchmark and the soak script.
//!
//! `langfuse-stand-in [--port P] [--project ID:PUBLIC_KEY:SECRET_KEY]... [--keep]`
//!
//! Prints `listening on http://…`, then once a second a line `exports=<accepted> spans=<n>`
//! with running totals. Stored observations are counted and dropped each second, so a long
//! run does not grow without bound; with `--keep` they are kept, so the read endpoints serve
//! them (the interop suite reads traces back through them).

use std::{net::SocketAddr, time::Duration};

use llmgate_test_support::langfuse::LangfuseStandIn;

#[tokio::main]
async fn main() {
    let mut port = 0u16;
    let mut projects = Vec::new();
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--keep" {
            keep = true;
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--port", Some(value)) => port = value.parse().unwrap_or_else(|_| usage(&format!("bad port {value}"))),
            ("--project", Some(value)) => match value.splitn(3, ':').collect::<Vec<_>>()[..] {
                [id, public_key, secret_key] => {
                    projects.push((id.to_owned(), public_key.to_owned(), secret_key.to_owned()))
                }
                _ => usage("--project takes ID:PUBLIC_KEY:SECRET_KEY"),
            },
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    let standin = LangfuseStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap_or_else(|e| usage(&format!("cannot listen on port {port}: {e}")));
    for (id, public_key, secret_key) in &projects {
        standin.add_project(id, public_key, secret_key);
    }
    println!("listening on {}", standin.url());
    let (mut exports, mut spans) = (0usize, 0usize);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if keep {
            let state = standin.lock();
            exports = state.accepted_exports();
            spans = state.stored.len();
        } else {
            let mut state = standin.lock();
            exports += state.exports.iter().filter(|e| e.status == 200).count();
            spans += state.stored.len();
            state.exports.clear();
            state.stored.clear();
        }
        println!("exports={exports} spans={spans}");
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "langfuse-stand-in: {problem}\nusage: langfuse-stand-in [--port P] [--project ID:PUBLIC_KEY:SECRET_KEY]... [--keep]"
    );
    std::process::exit(2)
}
