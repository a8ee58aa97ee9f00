//! A worker's step messages: token events go to their requests' outputs, the capacity report
//! to the worker's ledger, and ends finish, fail or requeue their requests. A message that
//! speaks of a sequence the worker was never given, brings tokens beyond a sequence's
//! `max_new_tokens`, or reports a capacity that contradicts what was sent, disconnects the
//! worker: its sequences resume elsewhere.

use std::time::Instant;

use openinfer_core::FinishReason;
use openinfer_proto::worker::v1 as wpb;

use super::state::{Effect, State, WorkerId};
use crate::error::RouterError;
use crate::request::Tokens;

impl State {
    /// Takes one of worker `wid`'s step messages.
    pub fn worker_event(
        &mut self,
        now: Instant,
        wid: WorkerId,
        resp: wpb::ExecuteResponse,
    ) -> Vec<Effect> {
        if let Err(why) = self.take_step(now, wid, resp) {
            self.disconnect(now, wid, why);
        }
        self.take_effects()
    }

    fn take_step(
        &mut self,
        now: Instant,
        wid: WorkerId,
        resp: wpb::ExecuteResponse,
    ) -> Result<(), String> {
        let Some(w) = self.workers.get_mut(&wid) else {
            return Ok(());
        };
        let busy = !w.running.is_empty();
        w.clock.observe(now, busy);
        let model = [w.spec.id.as_str()];
        let (itl, generated) = (
            self.metrics.itl.with_label_values(&model),
            self.metrics.generation_tokens.with_label_values(&model),
        );
        for ev in resp.tokens {
            w.knows(ev.sequence_id)?;
            if !w.running.contains_key(&ev.sequence_id) {
                continue; // cancelled here; the worker has not heard yet
            }
            if let Some(t) = self.requests.get_mut(&ev.sequence_id) {
                let n = ev.token_ids.len();
                let max_new = t.req.stopping.max_new_tokens as usize;
                if t.generated.len() + n > max_new {
                    return Err(format!(
                        "it sent sequence {} {} tokens beyond its max_new_tokens of {max_new}",
                        ev.sequence_id,
                        t.generated.len() + n - max_new
                    ));
                }
                if n > 0 {
                    if let Some(last) = t.last_token {
                        let gap = (now - last).as_secs_f64() / n as f64;
                        (0..n).for_each(|_| itl.observe(gap));
                    }
                    t.last_token = Some(now);
                    generated.inc_by(n as u64);
                }
                if let Some(q) = self.queues.get_mut(&t.req.model) {
                    q.charge(
                        &t.req.tenant,
                        self.cfg.fair_output_weight * n as f64 / t.req.weight,
                    );
                }
                t.generated.extend(&ev.token_ids);
                t.emitted_text_bytes += ev.text.len() as u64;
                t.output.push(ev, now);
            }
        }
        if let Some(cap) = resp.capacity {
            w.report(cap)?;
            let labels = [w.spec.id.as_str(), w.addr.as_str()];
            let m = &self.metrics;
            m.worker_running
                .with_label_values(&labels)
                .set(cap.running_sequences.into());
            m.worker_kv_used
                .with_label_values(&labels)
                .set(i64::from(cap.total_blocks) - i64::from(cap.free_blocks));
            m.worker_kv_total
                .with_label_values(&labels)
                .set(cap.total_blocks.into());
        }
        self.prefix_report(
            wid,
            resp.prefix_lossy,
            &resp.prefix_added,
            &resp.prefix_removed,
        );
        for f in resp.finished {
            self.finished(now, wid, f)?;
        }
        Ok(())
    }

    /// Worker `wid`'s prefix-cache changes. Keys of another length than 16 bytes are
    /// ignored (the worker is a peer, not trusted); a lossy report forgets what the worker
    /// held before it.
    fn prefix_report(
        &mut self,
        wid: WorkerId,
        lossy: bool,
        added: &[Vec<u8>],
        removed: &[Vec<u8>],
    ) {
        if lossy {
            self.prefix.forget(wid);
        }
        for k in removed {
            if let Ok(key) = <[u8; 16]>::try_from(k.as_slice()) {
                self.prefix.removed(wid, &key);
            }
        }
        for k in added {
            if let Ok(key) = <[u8; 16]>::try_from(k.as_slice()) {
                self.prefix.added(wid, key);
            }
        }
        if lossy || !added.is_empty() || !removed.is_empty() {
            self.metrics
                .prefix_index_entries
                .set(self.prefix.len() as i64);
        }
    }

    /// A sequence ended on worker `wid`.
    fn finished(
        &mut self,
        now: Instant,
        wid: WorkerId,
        f: wpb::SequenceFinished,
    ) -> Result<(), String> {
        let id = f.sequence_id;
        let Some(w) = self.workers.get_mut(&wid) else {
            return Ok(());
        };
        w.knows(id)?;
        w.given.remove(&id);
        w.releasing.retain(|&(r, _)| r != id);
        if w.running.remove(&id).is_none() {
            return Ok(()); // cancelled here: already answered
        }
        // A reason this build does not know ends the sequence as failed, with the message.
        let reason = f.finish_reason().unwrap_or(FinishReason::Error);
        if let Some(t) = self.requests.get_mut(&id) {
            if let Some(span) = t.dispatch_span.take() {
                span.record("openinfer.finish", reason.as_str());
            }
            // What the prefix cache saved of the prompt: on its first run (a resumed run
            // reuses its own tokens, which the client did not send). A worker cannot claim more
            // than the prompt.
            if t.cached_prompt_tokens.is_none() && reason != FinishReason::Rejected {
                t.cached_prompt_tokens =
                    Some(f.cached_prompt_tokens.min(t.req.prompt_ids.len() as u32));
            }
        }
        let outcome = match reason {
            FinishReason::Preempted => None,
            FinishReason::Rejected => {
                let Some(t) = self.requests.get_mut(&id) else {
                    return Ok(());
                };
                t.rejections += 1;
                (t.rejections >= self.cfg.max_dispatch_attempts).then(|| {
                    Err(RouterError::Unavailable(format!(
                        "workers refused this request {} times; last reason: {}",
                        t.rejections, f.message
                    )))
                })
            }
            FinishReason::Length | FinishReason::Stop | FinishReason::Eos => Some(Ok(reason)),
            FinishReason::Cancelled => Some(Err(RouterError::Worker(
                "the worker cancelled the sequence".into(),
            ))),
            FinishReason::Error => Some(Err(RouterError::Worker(f.message))),
        };
        match outcome {
            None => self.requeue(now, id),
            Some(result) => {
                let Some(t) = self.requests.remove(&id) else {
                    return Ok(());
                };
                match result {
                    Ok(reason) => {
                        if !t.req.stopping.ignore_eos {
                            self.typical_length
                                .entry(t.req.model.clone())
                                .or_default()
                                .observe(t.generated.len());
                        }
                        t.output.finish(
                            reason,
                            Tokens {
                                prompt: t.req.prompt_ids.len() as u32,
                                completion: t.generated.len() as u32,
                                cached_prompt: t.cached_prompt_tokens.unwrap_or(0),
                            },
                        );
                    }
                    Err(e) => {
                        self.wasted(&t);
                        t.output.fail(e);
                    }
                }
            }
        }
        Ok(())
    }
}
