//! Tensor parallelism across real rank processes on CPU: `openinfer worker --tp N` groups
//! behind a router give exactly the committed reference tokens (HF transformers, = tp 1) for
//! every fixture model at tp 2 and 4; ranks started one by one meet through a real etcd and
//! register as one worker; and when a rank dies, standalone or under the `--tp` supervisor,
//! the group leaves the registry and every rank process exits.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::etcd::EtcdServer;
use common::{
    assert_reference_tokens, greedy, reference_cases, registry_router, router_client, spawn,
    start_router, until_workers, wait_for_workers, Proc,
};
use openinfer_proto::v1 as pb;
use openinfer_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

async fn generate(client: &mut InferenceClient<Channel>, r: pb::GenerateRequest) -> Vec<u32> {
    client.generate(r).await.unwrap().into_inner().token_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp_2_and_4_groups_give_the_reference_tokens_through_the_router() {
    for model in ["llama", "llama3", "mistral", "qwen2"] {
        let dir = fixtures().join(model);
        for tp in ["2", "4"] {
            // Without --rank the worker starts and supervises the ranks itself.
            let (_group, addr) = spawn(
                &format!("{model} tp={tp}"),
                &[
                    "worker",
                    "--tp",
                    tp,
                    "--model",
                    dir.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:0",
                    "--block-size",
                    "4",
                    "--max-batch-tokens",
                    "24",
                ],
            );
            let (_router, raddr) = start_router(&[&addr], &[]);
            let mut client = router_client(&raddr).await;
            wait_for_workers(&mut client, 1).await;
            // All cases at once: batched, with chunked prefill over small blocks.
            assert_reference_tokens(&client, model, &format!("{model} tp={tp}")).await;
        }
    }
}

fn rank(etcd: &EtcdServer, model: &Path, rank: &str) -> (Proc, Option<String>) {
    let args = [
        "worker",
        "--tp",
        "2",
        "--rank",
        rank,
        "--group-id",
        "g-tp",
        "--registry",
        &etcd.url(),
        "--lease-ttl",
        "2s",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    if rank == "0" {
        let (p, addr) = spawn("rank 0", &args);
        (p, Some(addr))
    } else {
        let child = Command::new(common::bin())
            .args(args)
            .env("OPENINFER_LOG", "info")
            .spawn()
            .unwrap();
        (Proc(child), None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_meet_in_etcd_serve_as_one_worker_and_leave_together() {
    let etcd = EtcdServer::start();
    let model = fixtures().join("llama3");
    let (mut follower, _) = rank(&etcd, &model, "1");
    // Rank 0 announces its gRPC address only once the group has formed and loaded.
    let (mut leader, _) = rank(&etcd, &model, "0");
    let (_router, raddr) = registry_router(&etcd.url(), &[]);
    let mut client = router_client(&raddr).await;
    wait_for_workers(&mut client, 1).await;
    let (prompt, max_new, want) = reference_cases("llama3").remove(0);
    assert_eq!(generate(&mut client, greedy(&prompt, max_new)).await, want);

    // A rank dies while the group is idle: rank 0's heartbeat (every second) finds the ring
    // broken; it leaves the registry at once and exits with an error, and the router no
    // longer lists the group.
    follower.0.kill().unwrap();
    follower.0.wait().unwrap();
    let status = leader
        .exit_within(
            Duration::from_secs(5),
            "rank 0 kept running without its group",
        )
        .await;
    assert!(!status.success(), "rank 0 must fail when its group breaks");
    // The lease TTL is 2 s.
    until_workers(&mut client, 0, Duration::from_secs(3)).await;
}

/// The children of `pid` (Linux `/proc`).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether process `pid` was started as rank `rank` (its environment says so).
fn is_rank(pid: u32, rank: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|&b| b == 0)
                .any(|kv| kv == format!("OPENINFER_RANK={rank}").as_bytes())
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_group_stops_whole_when_one_rank_dies() {
    let etcd = EtcdServer::start();
    let model = fixtures().join("qwen2");
    let (mut supervisor, _) = spawn(
        "supervisor",
        &[
            "worker",
            "--tp",
            "2",
            "--registry",
            &etcd.url(),
            "--lease-ttl",
            "2s",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let (_router, raddr) = registry_router(&etcd.url(), &[]);
    let mut client = router_client(&raddr).await;
    wait_for_workers(&mut client, 1).await;
    let (prompt, max_new, want) = reference_cases("qwen2").remove(0);
    assert_eq!(generate(&mut client, greedy(&prompt, max_new)).await, want);

    let ranks = children(supervisor.0.id());
    assert_eq!(ranks.len(), 2, "the supervisor runs one process per rank");
    let follower = *ranks.iter().find(|&&p| is_rank(p, "1")).unwrap();
    Command::new("kill")
        .args(["-KILL", &follower.to_string()])
        .status()
        .unwrap();
    // The supervisor stops rank 0 (which leaves the registry) and fails.
    let status = supervisor
        .exit_within(
            Duration::from_secs(15),
            "the supervisor kept a broken group running",
        )
        .await;
    assert!(!status.success());
    for pid in ranks {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "rank process {pid} outlived its supervisor"
        );
    }
    until_workers(&mut client, 0, Duration::from_secs(3)).await;
}

/// One host of a tp 2 group split over two hosts (one rank each), the host given as its own
/// loopback address: what a LeaderWorkerSet pod runs (docs/deploy.md).
fn host_of_group(etcd: &EtcdServer, model: &Path, node: &str, ip: &str) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args([
        "worker",
        "--tp",
        "2",
        "--tp-nodes",
        "2",
        "--tp-node-rank",
        node,
        "--tp-listen",
        ip,
        "--group-id",
        "g-hosts",
        "--registry",
        &etcd.url(),
        "--model",
        model.to_str().unwrap(),
        "--listen",
        &format!("{ip}:0"),
        "--block-size",
        "4",
        "--max-batch-tokens",
        "24",
    ]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_across_two_hosts_meets_on_their_addresses_and_gives_the_reference_tokens() {
    let etcd = EtcdServer::start();
    let model = fixtures().join("llama");
    // Host 1 holds rank 1 only; host 0 holds rank 0, which serves gRPC once the group formed.
    let _follower = Proc(
        host_of_group(&etcd, &model, "1", "127.0.0.3")
            .spawn()
            .unwrap(),
    );
    let leader = common::spawn_service(
        "host 0",
        &mut host_of_group(&etcd, &model, "0", "127.0.0.2"),
    );
    assert!(leader.addr.starts_with("127.0.0.2:"), "{}", leader.addr);
    let (_router, raddr) = registry_router(&etcd.url(), &[]);
    let mut client = router_client(&raddr).await;
    wait_for_workers(&mut client, 1).await;

    // Each rank listened on its own host's address and was found there through etcd.
    let ring = leader
        .log()
        .into_iter()
        .find(|l| l.contains("connecting the tensor-parallel ring"))
        .expect("rank 0 logs the ring's addresses");
    assert!(
        ring.contains("127.0.0.2:") && ring.contains("127.0.0.3:"),
        "{ring}"
    );

    assert_reference_tokens(&client, "llama", "a group across two hosts").await;
}
