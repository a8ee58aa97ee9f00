//! The engine thread. It owns the [`Engine`], takes commands from a bounded channel, runs a
//! step whenever there is work, and sends each router connection one message per step with its
//! sequences' tokens, completions and the capacity report.
//!
//! Sequence ids on the wire are chosen by each router; the loop maps `(connection, id)` to the
//! engine's own ids so that two routers cannot collide.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openinfer_core::{Code, ErrorCode, FinishReason, SequenceId};
use openinfer_engine::engine::{Finished, StepOutput};
use openinfer_engine::Backend;
use openinfer_proto::worker::v1 as pb;
use openinfer_telemetry::{TelemetryError, TraceParent};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::convert;
use crate::metrics::WorkerMetrics;
use crate::trace::SequenceTrace;

/// Messages to one router connection.
pub type ResponseSender = mpsc::Sender<Result<pb::ExecuteResponse, Status>>;

/// Bounds of the loop's channels.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Commands waiting for the engine thread.
    pub command_queue: usize,
    /// Step messages buffered per router connection. A router that falls this far behind is
    /// disconnected (its sequences cancelled) so that it cannot stall the engine for others.
    pub connection_buffer: usize,
    /// Model id announced to routers (default: the engine's, its directory name).
    pub model_name: Option<String>,
    /// Where the worker's metrics are registered (default: nowhere that is served).
    pub registry: Option<prometheus::Registry>,
    /// After a step that freed sequence slots, while a router says it holds more work for
    /// this worker, how long to wait for that work before planning the next step (it comes
    /// in reply to the step's message; without the wait it would miss the next step).
    pub refill_wait: std::time::Duration,
    /// A chat template that replaces the model's own (`--chat-template`), as text.
    pub chat_template: Option<String>,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            command_queue: 1024,
            connection_buffer: 256,
            model_name: None,
            registry: None,
            refill_wait: std::time::Duration::from_millis(5),
            chat_template: None,
        }
    }
}

/// What the service asks of the engine thread.
pub enum Command {
    /// A router connected; its step messages go to `tx`.
    Connect {
        /// Connection id.
        conn: u64,
        /// Where its messages go.
        tx: ResponseSender,
        /// The `traceparent` of the stream's metadata, for sequences that carry none.
        trace: Option<TraceParent>,
    },
    /// The connection ended: cancel all of its sequences.
    Disconnect {
        /// Connection id.
        conn: u64,
    },
    /// Start sequences.
    Dispatch {
        /// Connection id.
        conn: u64,
        /// The sequences.
        sequences: Vec<pb::SequenceSpec>,
        /// The router holds more work this worker could take.
        backlog: bool,
    },
    /// Cancel sequences (their KV is freed at once).
    Cancel {
        /// Connection id.
        conn: u64,
        /// Router-side ids.
        ids: Vec<u64>,
    },
    /// Stop taking new sequences (they are rejected, and capacity reports say `draining`).
    Drain,
    /// Preempt every sequence: the routers resume them elsewhere (the end of a drain).
    PreemptAll,
    /// End every router's stream (after a drain, so that the server can stop).
    CloseAll,
    /// Check, when idle, that what the engine depends on is there (its tensor-parallel group).
    Heartbeat,
    /// Preempt sequences (their KV is freed; the router resumes them later).
    Preempt {
        /// Connection id.
        conn: u64,
        /// Router-side ids.
        ids: Vec<u64>,
    },
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    info: Arc<pb::InfoResponse>,
    tokenizer: Arc<pb::TokenizerResponse>,
    capacity: watch::Receiver<pb::CapacityReport>,
    next_conn: Arc<AtomicU64>,
    cfg: LoopConfig,
    /// Why the engine thread stopped on its own, once it has.
    failure: watch::Receiver<Option<String>>,
}

impl EngineHandle {
    /// Starts the engine thread around `engine` (the model [`Engine`](openinfer_engine::Engine)
    /// or a [`SimEngine`](openinfer_engine::SimEngine)). Fails when the worker's metrics
    /// cannot be registered (a second worker on the same registry).
    pub fn spawn<E: Backend>(
        engine: E,
        cfg: LoopConfig,
    ) -> Result<(EngineHandle, std::thread::JoinHandle<()>), TelemetryError> {
        let (tx, rx) = mpsc::channel(cfg.command_queue.max(1));
        let mut info = convert::info(engine.info());
        if let Some(name) = &cfg.model_name {
            info.model = name.clone();
        }
        let metrics = WorkerMetrics::new(&cfg.registry.clone().unwrap_or_default(), &info.model)?;
        let info = Arc::new(info);
        let mut tokenizer = convert::tokenizer(engine.tokenizer());
        if let Some(t) = &cfg.chat_template {
            tokenizer.chat_template = Some(t.clone());
        }
        let tokenizer = Arc::new(tokenizer);
        let (cap_tx, cap_rx) = watch::channel(convert::capacity(&engine.capacity()));
        let (failure_tx, failure) = watch::channel(None);
        let lp = Loop {
            refill_wait: cfg.refill_wait,
            model: info.model.clone(),
            metrics,
            traces: HashMap::new(),
            failure: failure_tx,
            engine,
            rx,
            capacity: cap_tx,
            conns: HashMap::new(),
            by_engine: HashMap::new(),
            by_wire: HashMap::new(),
            next_id: 0,
            total_dispatched: 0,
            draining: false,
            outbox: HashMap::new(),
        };
        if let Some(every) = lp.engine.heartbeat_interval() {
            // Holds only a weak sender, so that the loop still ends when every handle is gone.
            let weak = tx.downgrade();
            let _ = std::thread::Builder::new()
                .name("openinfer-heartbeat".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    match weak.upgrade() {
                        Some(tx) => {
                            let _ = tx.try_send(Command::Heartbeat);
                        }
                        None => return,
                    }
                });
        }
        let join = std::thread::Builder::new()
            .name("openinfer-engine".into())
            .spawn(move || lp.run())
            .expect("spawning the engine thread");
        Ok((
            EngineHandle {
                tx,
                info,
                tokenizer,
                capacity: cap_rx,
                next_conn: Arc::new(AtomicU64::new(1)),
                cfg,
                failure,
            },
            join,
        ))
    }

    /// Sends a command; fails with `UNAVAILABLE` when the engine thread is gone.
    pub async fn send(&self, cmd: Command) -> Result<(), Status> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| Status::unavailable("the worker's engine has stopped; use another worker"))
    }

    /// Model and limits.
    pub fn info(&self) -> &pb::InfoResponse {
        &self.info
    }

    /// The model's tokenizer, as served to routers.
    pub fn tokenizer(&self) -> &pb::TokenizerResponse {
        &self.tokenizer
    }

    /// The latest capacity report.
    pub fn capacity(&self) -> pb::CapacityReport {
        *self.capacity.borrow()
    }

    /// Drains the worker: new sequences are refused at once; running ones get up to `grace`
    /// to finish, then are preempted so that their routers resume them elsewhere. Returns when
    /// the engine is empty.
    pub async fn drain(&self, grace: std::time::Duration) -> Result<(), Status> {
        self.send(Command::Drain).await?;
        let mut cap = self.capacity.clone();
        let idle =
            |c: &pb::CapacityReport| c.draining && c.running_sequences + c.waiting_sequences == 0;
        if tokio::time::timeout(grace, cap.wait_for(idle))
            .await
            .is_err()
        {
            let c = self.capacity();
            tracing::info!(
                running = c.running_sequences,
                waiting = c.waiting_sequences,
                "drain grace period over; preempting the rest so that routers resume them elsewhere"
            );
            self.send(Command::PreemptAll).await?;
            let _ = cap.wait_for(idle).await;
        }
        // Routers see their streams end (and stop dialing a worker that left the registry).
        self.send(Command::CloseAll).await
    }

    /// Resolves with the reason when the engine stops on its own: its tensor-parallel group
    /// broke (a rank is gone), so this worker can serve nothing more and must leave.
    pub async fn failed(&self) -> String {
        let mut f = self.failure.clone();
        let reason = match f.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the engine thread stopped".into(),
        };
        reason
    }

    /// A fresh connection id.
    pub fn new_connection(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The loop's channel bounds.
    pub fn config(&self) -> &LoopConfig {
        &self.cfg
    }
}

/// One router connection.
struct Connection {
    tx: ResponseSender,
    /// Sequences it dispatched that the loop has taken in (reported back as credits).
    dispatched: u64,
    /// The stream's own trace context (from its gRPC metadata), if any.
    trace: Option<TraceParent>,
    /// Its latest dispatch said it holds more work for this worker.
    backlog: bool,
}

struct Loop<E> {
    engine: E,
    /// See [`LoopConfig::refill_wait`].
    refill_wait: std::time::Duration,
    /// Model id (for spans).
    model: String,
    metrics: WorkerMetrics,
    /// The open span of each sequence.
    traces: HashMap<SequenceId, SequenceTrace>,
    /// Told why the loop stopped on its own.
    failure: watch::Sender<Option<String>>,
    rx: mpsc::Receiver<Command>,
    capacity: watch::Sender<pb::CapacityReport>,
    conns: HashMap<u64, Connection>,
    by_engine: HashMap<SequenceId, (u64, u64)>,
    by_wire: HashMap<(u64, u64), SequenceId>,
    next_id: u64,
    /// Sequences dispatched over all connections, ever (reported by `Health`).
    total_dispatched: u64,
    /// Shutting down: no new sequences.
    draining: bool,
    /// Messages being assembled for each connection this iteration.
    outbox: HashMap<u64, pb::ExecuteResponse>,
}

impl<E: Backend> Loop<E> {
    fn run(mut self) {
        let mut refill = false;
        loop {
            // Block only when idle; otherwise take whatever arrived and keep stepping.
            if !self.engine.has_work() {
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            if self.failure.borrow().is_some() {
                break;
            }
            if self.engine.has_work() {
                let started = std::time::Instant::now();
                match self.engine.step() {
                    Ok(out) => {
                        let m = &self.metrics;
                        m.step_duration.observe(started.elapsed().as_secs_f64());
                        m.batch_size.observe(out.batch_sequences as f64);
                        m.generation_tokens.inc_by(out.tokens.len() as u64);
                        refill = !out.finished.is_empty();
                        self.route(out)
                    }
                    // The group cannot step any more: stop, so that routers see the streams
                    // end and resume the sequences elsewhere.
                    Err(e) if e.code() == Code::Unavailable => {
                        tracing::error!(error = %e, "engine stopped");
                        self.failure.send_replace(Some(e.to_string()));
                        break;
                    }
                    Err(e) => tracing::error!(error = %e, "engine step failed"),
                }
            }
            self.flush();
            if std::mem::take(&mut refill) && self.conns.values().any(|c| c.backlog) {
                self.await_refill();
            }
        }
        tracing::info!("engine thread stopped: every handle was dropped");
    }

    /// Waits up to `refill_wait` for a dispatch (taking whatever else arrives meanwhile):
    /// slots just freed, and a router said it holds work for them.
    fn await_refill(&mut self) {
        let until = std::time::Instant::now() + self.refill_wait;
        while std::time::Instant::now() < until {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    let dispatch = matches!(cmd, Command::Dispatch { .. });
                    self.handle(cmd);
                    if dispatch {
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(std::time::Duration::from_micros(50))
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { conn, tx, trace } => {
                let _ = tx.try_send(Ok(pb::ExecuteResponse {
                    capacity: Some(convert::capacity(&self.engine.capacity())),
                    ..Default::default()
                }));
                self.conns.insert(
                    conn,
                    Connection {
                        tx,
                        dispatched: 0,
                        trace,
                        backlog: false,
                    },
                );
                self.metrics.connections.set(self.conns.len() as i64);
            }
            Command::Disconnect { conn } => self.disconnect(conn),
            // A connection already dropped (it stopped reading) gets no new work.
            Command::Dispatch { conn, .. } if !self.conns.contains_key(&conn) => {}
            Command::Dispatch {
                conn,
                sequences,
                backlog,
            } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.dispatched += sequences.len() as u64;
                    c.backlog = backlog;
                }
                self.total_dispatched += sequences.len() as u64;
                // The router hears the new count with the next step's capacity report.
                self.outbox.entry(conn).or_default();
                for spec in sequences {
                    self.dispatch(conn, spec);
                }
            }
            Command::Cancel { conn, ids } => self.remove(conn, ids, E::cancel),
            Command::Preempt { conn, ids } => self.remove(conn, ids, E::preempt),
            Command::Drain => {
                self.draining = true;
                // Every router hears it with the next report.
                for &conn in self.conns.keys() {
                    self.outbox.entry(conn).or_default();
                }
            }
            Command::CloseAll => {
                self.conns.clear();
                self.outbox.clear();
                self.metrics.connections.set(0);
            }
            // A busy engine proves the same with every step.
            Command::Heartbeat if self.engine.has_work() => {}
            Command::Heartbeat => {
                if let Err(e) = self.engine.heartbeat() {
                    tracing::error!(error = %e, "engine stopped");
                    self.failure.send_replace(Some(e.to_string()));
                }
            }
            Command::PreemptAll => {
                let ids: Vec<SequenceId> = self.by_engine.keys().copied().collect();
                for id in ids {
                    if let Some(f) = self.engine.preempt(id) {
                        self.finish(&f);
                    }
                }
            }
        }
    }

    fn dispatch(&mut self, conn: u64, spec: pb::SequenceSpec) {
        let wire = spec.sequence_id;
        let prompt_tokens = spec.prompt_ids.len() as u32;
        if self.draining {
            self.reject(
                conn,
                wire,
                prompt_tokens,
                "this worker is draining; send the sequence to another worker".into(),
            );
            return;
        }
        if self.by_wire.contains_key(&(conn, wire)) {
            self.reject(
                conn,
                wire,
                prompt_tokens,
                format!("sequence {wire} is already running on this connection"),
            );
            return;
        }
        self.next_id += 1;
        let id = SequenceId(self.next_id);
        let stream_trace = self.conns.get(&conn).and_then(|c| c.trace);
        let trace = SequenceTrace::start(&spec, &self.model, stream_trace);
        let taken = (spec.prompt_ids.len() + spec.generated_ids.len()) as u64;
        match self.engine.add(convert::sequence_request(spec, id)) {
            Ok(()) => {
                self.by_wire.insert((conn, wire), id);
                self.by_engine.insert(id, (conn, wire));
                self.traces.insert(id, trace);
                self.metrics.prompt_tokens.inc_by(taken);
            }
            Err(e) => {
                tracing::debug!(parent: trace.span(), error = %e, "sequence rejected");
                trace.end(FinishReason::Rejected, 0);
                self.reject(conn, wire, prompt_tokens, e.to_string());
            }
        }
    }

    fn reject(&mut self, conn: u64, wire: u64, prompt_tokens: u32, message: String) {
        self.metrics.sequence_ended(FinishReason::Rejected);
        self.outbox
            .entry(conn)
            .or_default()
            .finished
            .push(pb::SequenceFinished {
                sequence_id: wire,
                reason: pb::FinishReason::Rejected as i32,
                prompt_tokens,
                completion_tokens: 0,
                cached_prompt_tokens: 0,
                message,
            });
    }

    fn remove(&mut self, conn: u64, ids: Vec<u64>, op: fn(&mut E, SequenceId) -> Option<Finished>) {
        for wire in ids {
            if let Some(id) = self.by_wire.get(&(conn, wire)).copied() {
                if let Some(f) = op(&mut self.engine, id) {
                    self.finish(&f);
                }
            }
        }
    }

    fn disconnect(&mut self, conn: u64) {
        self.conns.remove(&conn);
        self.metrics.connections.set(self.conns.len() as i64);
        let ids: Vec<SequenceId> = self
            .by_engine
            .iter()
            .filter(|(_, (c, _))| *c == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(f) = self.engine.cancel(id) {
                self.finish(&f);
            } else if let Some(key) = self.by_engine.remove(&id) {
                self.traces.remove(&id);
                self.by_wire.remove(&key);
            }
        }
        // Nobody is left to hear about those ends.
        self.outbox.remove(&conn);
        tracing::debug!(
            conn,
            "router connection closed; its sequences were cancelled"
        );
    }

    fn finish(&mut self, f: &Finished) {
        self.metrics.sequence_ended(f.reason);
        if let Some(t) = self.traces.remove(&f.id) {
            t.end(f.reason, f.completion_tokens);
        }
        if let Some((conn, wire)) = self.by_engine.remove(&f.id) {
            self.by_wire.remove(&(conn, wire));
            self.outbox
                .entry(conn)
                .or_default()
                .finished
                .push(convert::finished(f, wire));
        }
    }

    fn route(&mut self, out: StepOutput) {
        for t in &out.tokens {
            if let Some(trace) = self.traces.get_mut(&t.id) {
                trace.token();
            }
            if let Some(&(conn, wire)) = self.by_engine.get(&t.id) {
                self.outbox
                    .entry(conn)
                    .or_default()
                    .tokens
                    .push(pb::TokenEvent {
                        sequence_id: wire,
                        token_ids: vec![t.token],
                        text: t.text.clone(),
                        logprobs: t.logprob.iter().map(convert::logprob).collect(),
                    });
            }
        }
        for f in &out.finished {
            self.finish(f);
        }
        // Every connection hears the capacity after every step.
        for &conn in self.conns.keys() {
            self.outbox.entry(conn).or_default();
        }
    }

    /// Sends the assembled messages with the current capacity. A connection whose receiver is
    /// gone, or that stopped reading and filled its buffer, is disconnected.
    fn flush(&mut self) {
        let cap = self.capacity_report();
        self.capacity.send_replace(cap);
        let m = &self.metrics;
        m.running.set(cap.running_sequences.into());
        m.waiting.set(cap.waiting_sequences.into());
        m.kv_used
            .set(i64::from(cap.total_blocks) - i64::from(cap.free_blocks));
        m.kv_total.set(cap.total_blocks.into());
        m.prefix_cache(&self.engine.capacity().prefix_cache);
        // Every router hears of every change to the prefix cache.
        let events = self.engine.take_cache_events();
        if !events.is_empty() {
            for &conn in self.conns.keys() {
                self.outbox.entry(conn).or_default();
            }
        }
        let added: Vec<Vec<u8>> = events.added.iter().map(|k| k.to_vec()).collect();
        let removed: Vec<Vec<u8>> = events.removed.iter().map(|k| k.to_vec()).collect();
        let mut gone = Vec::new();
        for (conn, mut msg) in self.outbox.drain() {
            let Some(Connection { tx, dispatched, .. }) = self.conns.get(&conn) else {
                continue;
            };
            msg.capacity = Some(pb::CapacityReport {
                dispatched: *dispatched,
                ..cap
            });
            msg.prefix_added.clone_from(&added);
            msg.prefix_removed.clone_from(&removed);
            msg.prefix_lossy = events.lossy;
            // The last free slot is kept for the status that tells a lagging router why its
            // stream ends.
            let sent = if tx.capacity() > 1 {
                tx.try_send(Ok(msg)).is_ok()
            } else {
                tracing::warn!(conn, "router connection stopped reading; disconnecting it");
                let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                    "this router fell {} step messages behind the worker; its sequences were cancelled, reconnect and resubmit",
                    tx.max_capacity()
                ))));
                false
            };
            if !sent {
                gone.push(conn);
            }
        }
        if !gone.is_empty() {
            for conn in gone {
                self.disconnect(conn);
            }
            // Their cancelled sequences freed blocks: Health must see that now.
            self.capacity.send_replace(self.capacity_report());
        }
    }

    /// The engine's capacity, with the all-connections dispatch count (as `Health` shows it).
    fn capacity_report(&self) -> pb::CapacityReport {
        let cap = convert::capacity(&self.engine.capacity());
        pb::CapacityReport {
            dispatched: self.total_dispatched,
            draining: self.draining,
            free_sequence_slots: if self.draining {
                0
            } else {
                cap.free_sequence_slots
            },
            ..cap
        }
    }
}
