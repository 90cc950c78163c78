//! Workers' commands on the primary: the policy's verdict, deferral and
//! retry, and the approval lifecycle of actions (R-ACT2); per-device policy
//! documents. Every decision, transition and policy change is appended to
//! the ledger in the same storage batch as the state it changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::primary::{Primary, PrimaryRt};
use super::primary::{run_handler, session_conn};
use super::{CommandRequest, NodeError, Verdict, lock};
use crate::identity::NodeId;
use crate::ledger::record_types;
use crate::storage::records::{ActionRecord, ActionState, ExecPolicyRecord};
use crate::storage::{Record, StorageExt};
use crate::wire::{
    Command, CommandOutcome, CommandUsage, EventPayload, JsonText, MessageId, Payload, Platform,
};

/// How often a deferred command is decided again before giving up.
const MAX_DEFERRALS: u32 = 3;

/// Action states.
pub mod states {
    use crate::storage::records::ActionState;

    /// Waiting for a person.
    pub const PROPOSED: &str = ActionState::Proposed.as_str_const();
    /// Approved; about to run.
    pub const APPROVED: &str = ActionState::Approved.as_str_const();
    /// Running.
    pub const EXECUTING: &str = ActionState::Executing.as_str_const();
    /// Ran; `result` holds the outcome.
    pub const EXECUTED: &str = ActionState::Executed.as_str_const();
    /// Ran and failed; `error` says why.
    pub const FAILED: &str = ActionState::Failed.as_str_const();
    /// Refused by a person.
    pub const REJECTED: &str = ActionState::Rejected.as_str_const();
    /// Void: its device was revoked or unpaired before anyone decided.
    pub const VOIDED: &str = ActionState::Voided.as_str_const();
}

/// Whether `node` is still paired and not revoked (a storage error counts
/// as no: nothing runs on a device the primary cannot vouch for).
fn still_paired(inner: &PrimaryRt, node: &NodeId) -> bool {
    super::protocols::paired(&inner.registry, node)
}

/// A command of `node` succeeded: its trust rises (R-PAIR8), written on the
/// blocking pool like the decision. A failure to record it is published,
/// not fatal to the command.
async fn record_success(inner: &Arc<PrimaryRt>, node: NodeId) {
    let writing = inner.clone();
    let written =
        tokio::task::spawn_blocking(move || writing.registry.record_success(&node, writing.now()))
            .await;
    let error = match written {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    inner.events.publish(
        "trust.update_failed",
        inner.now(),
        json!({ "device": node.to_string(), "error": error }),
    );
}

/// A claim on an action being decided; released on drop.
struct Claim<'a> {
    inner: &'a PrimaryRt,
    id: String,
}

impl<'a> Claim<'a> {
    /// Claims action `id`, or says another decision holds it.
    fn take(inner: &'a PrimaryRt, id: &str) -> Result<Self, NodeError> {
        if !super::lock(&inner.primary.claimed).insert(id.to_owned()) {
            return Err(NodeError::Unavailable(format!(
                "action {id} is being decided already"
            )));
        }
        Ok(Claim {
            inner,
            id: id.to_owned(),
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        super::lock(&self.inner.primary.claimed).remove(&self.id);
    }
}

/// Voids `device`'s proposed actions (revoked or unpaired): each goes
/// proposed → voided, with its ledger record.
pub(super) async fn void_actions(
    inner: &PrimaryRt,
    device: &NodeId,
    why: &str,
) -> Result<(), NodeError> {
    let all: Vec<ActionRecord> = inner.store.load_all()?;
    for a in all
        .into_iter()
        .filter(|a| a.proposed_by == *device && a.state == ActionState::Proposed)
    {
        // One being approved right now is left to that approval.
        let Ok(_claim) = Claim::take(inner, &a.id) else {
            continue;
        };
        // Read again under the claim: a decision may have finished since.
        let Some(mut a) = inner.store.load::<ActionRecord>(&a.id)? else {
            continue;
        };
        if a.state != ActionState::Proposed {
            continue;
        }
        a.state = ActionState::Voided;
        a.decided_by = Some(inner.key.node_id().to_string());
        a.error = Some(format!("the device was {why}"));
        a.updated_at = inner.now();
        transition(inner, &a).await?;
    }
    Ok(())
}

/// A worker's command: decide (again after a deferral), record the decision,
/// and run it, refuse it, or propose it for approval.
pub(super) async fn on_worker_command(
    inner: &Arc<PrimaryRt>,
    node: NodeId,
    cmd: &Command,
) -> CommandOutcome {
    let usage = cmd.usage.unwrap_or_default();
    if let Err(message) = usage.validate() {
        return CommandOutcome::Err {
            code: "invalid_args".into(),
            message,
        };
    }
    let mut deferrals = 0;
    let mut waited = Duration::ZERO;
    loop {
        let now = inner.now();
        let power = super::lock(&inner.primary.power).get(&node).cloned();
        let request = CommandRequest::new(&node, &cmd.name, now)
            .platform(power.as_ref().map_or(Platform::Desktop, |p| p.platform))
            .metrics(power.as_ref().and_then(|p| p.metrics.as_ref()))
            .usage(usage);
        let (verdict, permit) = inner.policy.decide(&request);
        // Durable (an fsync) before anything runs, and off the async
        // threads: heartbeats and other devices' messages go on meanwhile.
        let recording = (inner.clone(), cmd.clone(), verdict.clone());
        let recorded = tokio::task::spawn_blocking(move || {
            let (inner, cmd, verdict) = recording;
            record_decision(&inner, node, &cmd.name, &verdict)
        })
        .await;
        let failed = match recorded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("recording the decision did not finish: {e}")),
        };
        if let Some(message) = failed {
            return CommandOutcome::Err {
                code: "audit_failed".into(),
                message,
            };
        }
        // Revoked or unpaired since its message passed the gate (the
        // cancellation may have run before this task registered): nothing
        // runs and nothing is proposed.
        if !still_paired(inner, &node) {
            return CommandOutcome::Err {
                code: "cancelled".into(),
                message: "the device was revoked or unpaired".into(),
            };
        }
        match verdict {
            Verdict::Allow => {
                // The permit goes with the handler's thread.
                let outcome =
                    run_handler(inner, &cmd.name, &cmd.args, "unknown_command", permit).await;
                if matches!(outcome, CommandOutcome::Ok(_)) {
                    record_success(inner, node).await;
                }
                return outcome;
            }
            Verdict::Deny { code, message } => return CommandOutcome::Err { code, message },
            Verdict::NeedsApproval { message, .. } => {
                // A place among the device's open proposals, taken before
                // the proposal is written (so concurrent ones cannot pass
                // the cap together) and given back if it is not.
                let cap = inner.config.peer_limits.proposed_actions;
                let reserved = {
                    let mut open = lock(&inner.primary.proposed);
                    let n = open.entry(node).or_insert(0);
                    if *n >= cap {
                        false
                    } else {
                        *n += 1;
                        true
                    }
                };
                if !reserved {
                    inner.stats.commands_refused.fetch_add(1, Ordering::Relaxed);
                    return CommandOutcome::Err {
                        code: "too_many_actions".into(),
                        message: format!(
                            "this device has {cap} actions waiting for approval; decide those first"
                        ),
                    };
                }
                return match propose(inner, node, cmd).await {
                    Ok(id) => CommandOutcome::Err {
                        code: "needs_approval".into(),
                        message: format!("{message}; awaiting approval as action {id}"),
                    },
                    Err(e) => {
                        proposal_settled(inner, node);
                        CommandOutcome::Err {
                            code: "audit_failed".into(),
                            message: e.to_string(),
                        }
                    }
                };
            }
            Verdict::Defer {
                delay_ms, message, ..
            } => {
                let delay = Duration::from_millis(delay_ms);
                deferrals += 1;
                waited += delay;
                if deferrals > MAX_DEFERRALS || waited >= inner.config.command_timeout {
                    return CommandOutcome::Err {
                        code: "deferred".into(),
                        message: format!("{message}; retry in {delay_ms} ms"),
                    };
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

pub(super) fn record_decision(
    inner: &PrimaryRt,
    node: NodeId,
    command: &str,
    verdict: &Verdict,
) -> Result<(), NodeError> {
    let (code, message) = match verdict {
        Verdict::Allow => (None, None),
        Verdict::Deny { code, message }
        | Verdict::NeedsApproval { code, message }
        | Verdict::Defer { code, message, .. } => (Some(code), Some(message)),
    };
    let body = json!({
        "device": node.to_string(),
        "command": command,
        "decision": verdict.name(),
        "reason": code,
        "message": message,
    });
    inner.registry.commit(
        vec![],
        record_types::COMMAND_DECIDED,
        body.clone(),
        inner.now(),
    )?;
    inner.events.publish("command.decided", inner.now(), body);
    // A command the policy refused outright is also a violation (R-POL):
    // one event a dashboard or an alert can follow without parsing
    // decisions.
    if let Verdict::Deny { code, message } = verdict {
        inner.events.publish(
            crate::events::kinds::POLICY_VIOLATION,
            inner.now(),
            json!({
                "device": node.to_string(),
                "command": command,
                "reason": code,
                "message": message,
            }),
        );
    }
    Ok(())
}

/// Stores an action and its transition record together; tells the worker.
/// A move the lifecycle does not allow ([`ActionState::can_become`]) is
/// refused and changes nothing.
async fn transition(inner: &PrimaryRt, action: &ActionRecord) -> Result<(), NodeError> {
    let stored = inner.store.load::<ActionRecord>(&action.id)?;
    if let Some(stored) = &stored
        && !stored.state.can_become(action.state)
    {
        return Err(NodeError::Unavailable(format!(
            "action {} cannot go from {} to {}",
            action.id, stored.state, action.state
        )));
    }
    let leaves_proposed = stored
        .as_ref()
        .is_some_and(|s| s.state == ActionState::Proposed);
    let body = json!({
        "action": action.id,
        "state": action.state,
        "command": action.command,
        "device": action.proposed_by.to_string(),
        "by": action.decided_by,
        "error": action.error,
    });
    inner.registry.commit(
        vec![action.put()?],
        record_types::ACTION_TRANSITION,
        body,
        action.updated_at,
    )?;
    if leaves_proposed {
        proposal_settled(inner, action.proposed_by);
    }
    let data = json!({
        "id": action.id,
        "state": action.state,
        "command": action.command,
        "result": action.result.as_ref().and_then(|r| serde_json::from_str::<Value>(r.as_str()).ok()),
        "error": action.error,
    });
    inner
        .events
        .publish("action.updated", action.updated_at, data.clone());
    // The proposing worker hears of it too, if connected and allowed to
    // read actions (`actions:read`).
    let may_read = inner
        .registry
        .get(&action.proposed_by)
        .ok()
        .flatten()
        .is_some_and(|d| d.has_scope(crate::registry::scopes::ACTIONS_READ));
    if !may_read {
        return Ok(());
    }
    if let Some(conn) = session_conn(inner, &action.proposed_by) {
        let event = Payload::Event(EventPayload {
            kind: "action.updated".into(),
            data: JsonText::from_value(&data).unwrap_or_else(|_| JsonText::null()),
        });
        let send = inner
            .link
            .send(conn.as_ref(), action.proposed_by, event, inner.now());
        let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
    }
    Ok(())
}

async fn propose(inner: &PrimaryRt, node: NodeId, cmd: &Command) -> Result<String, NodeError> {
    let now = inner.now();
    let action = ActionRecord {
        id: MessageId::random().to_string(),
        state: ActionState::Proposed,
        command: cmd.name.clone(),
        params: cmd.args.clone(),
        proposed_by: node,
        decided_by: None,
        created_at: now,
        updated_at: now,
        result: None,
        error: None,
    };
    transition(inner, &action).await?;
    Ok(action.id)
}

impl Primary {
    /// Every action, newest first.
    pub fn actions(&self) -> Result<Vec<ActionRecord>, NodeError> {
        let inner = &self.rt;
        let mut all: Vec<ActionRecord> = inner.store.load_all()?;
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(all)
    }

    /// Action `id`, claimed for a decision, if it is still proposed.
    fn claim_proposed(&self, id: &str) -> Result<(Claim<'_>, ActionRecord), NodeError> {
        let inner = &self.rt;
        let claim = Claim::take(inner, id)?;
        // Read after the claim: a decision that finished before it shows.
        let action: ActionRecord = inner
            .store
            .load(id)?
            .ok_or_else(|| NodeError::NotFound(format!("no action {id}")))?;
        if action.state != ActionState::Proposed {
            return Err(NodeError::Unavailable(format!(
                "action {id} is {}, not proposed",
                action.state
            )));
        }
        Ok((claim, action))
    }

    /// Approves a proposed action: it runs now (approved → executing →
    /// executed or failed) and the final record is returned.
    /// Two concurrent approvals run it once: the second is refused.
    pub async fn approve_action(&self, id: &str) -> Result<ActionRecord, NodeError> {
        let (_claim, mut action) = self.claim_proposed(id)?;
        let inner = &self.rt;
        if !still_paired(inner, &action.proposed_by) {
            return Err(NodeError::Unavailable(format!(
                "action {id} was proposed by a device that is no longer paired"
            )));
        }
        let me = Some(inner.key.node_id().to_string());
        for state in [ActionState::Approved, ActionState::Executing] {
            action.state = state;
            action.decided_by.clone_from(&me);
            action.updated_at = inner.now();
            transition(inner, &action).await?;
        }
        match run_handler(
            inner,
            &action.command,
            &action.params,
            "unknown_command",
            super::Permit::none(),
        )
        .await
        {
            CommandOutcome::Ok(result) => {
                action.state = ActionState::Executed;
                action.result = Some(result);
                record_success(&self.rt, action.proposed_by).await;
            }
            CommandOutcome::Err { code, message } => {
                action.state = ActionState::Failed;
                action.error = Some(format!("{code}: {message}"));
            }
        }
        action.updated_at = inner.now();
        transition(inner, &action).await?;
        Ok(action)
    }

    /// Rejects a proposed action.
    pub async fn reject_action(
        &self,
        id: &str,
        reason: Option<String>,
    ) -> Result<ActionRecord, NodeError> {
        let (_claim, mut action) = self.claim_proposed(id)?;
        let inner = &self.rt;
        action.state = ActionState::Rejected;
        action.decided_by = Some(inner.key.node_id().to_string());
        action.error = reason;
        action.updated_at = inner.now();
        transition(inner, &action).await?;
        Ok(action)
    }

    /// Sets `device`'s execution policy (a mesh-policy document, JSON). The
    /// document is checked first, then stored and audited together, and only
    /// once that is durable does it go live: a decision is never made under
    /// a policy the ledger does not have. Concurrent calls are applied in
    /// one order, so the live policy is always the last one committed.
    pub fn set_policy(&self, device: &NodeId, document: &str) -> Result<(), NodeError> {
        let inner = &self.rt;
        let text = JsonText::new(document).map_err(|e| NodeError::Policy(e.to_string()))?;
        inner.policy.validate(document).map_err(NodeError::Policy)?;
        let record = ExecPolicyRecord {
            node: *device,
            document: text,
            updated_at: inner.now(),
        };
        let body = json!({ "device": device.to_string(), "document": serde_json::from_str::<Value>(document).unwrap_or(Value::Null) });
        // Not a hot lock: only policy changes take it.
        let _order = super::lock(&inner.primary.policy_changes);
        inner.registry.commit(
            vec![record.put()?],
            record_types::POLICY_SET,
            body,
            inner.now(),
        )?;
        inner
            .policy
            .install(device, document)
            .map_err(NodeError::Policy)?;
        inner.events.publish(
            "policy.updated",
            inner.now(),
            json!({ "device": device.to_string() }),
        );
        Ok(())
    }

    /// What `device`'s policy would decide for `command` now (with its
    /// latest heartbeat metrics), without running or recording anything:
    /// a dry run for a UI or a script.
    pub fn check_command(&self, device: &NodeId, command: &str) -> Result<Verdict, NodeError> {
        self.check_command_with(device, command, CommandUsage::default())
    }

    /// [`Primary::check_command`] for a command declaring `usage`.
    pub fn check_command_with(
        &self,
        device: &NodeId,
        command: &str,
        usage: CommandUsage,
    ) -> Result<Verdict, NodeError> {
        usage.validate().map_err(NodeError::Policy)?;
        let inner = &self.rt;
        let power = super::lock(&inner.primary.power).get(device).cloned();
        let platform = match &power {
            Some(p) => p.platform,
            None => inner
                .registry
                .get(device)?
                .map_or(Platform::Desktop, |d| d.platform),
        };
        let request = CommandRequest::new(device, command, inner.now())
            .platform(platform)
            .metrics(power.as_ref().and_then(|p| p.metrics.as_ref()))
            .usage(usage);
        let (verdict, _permit) = inner.policy.decide(&request);
        Ok(verdict)
    }

    /// `device`'s policy document, if one is set.
    pub fn policy(&self, device: &NodeId) -> Result<Option<Value>, NodeError> {
        let inner = &self.rt;
        let record: Option<ExecPolicyRecord> = inner.store.load(&device.to_string())?;
        Ok(record.and_then(|r| serde_json::from_str(r.document.as_str()).ok()))
    }
}

/// Installs the stored policies (at start: a restart keeps them).
/// One of `node`'s proposals was decided (or never written).
fn proposal_settled(inner: &PrimaryRt, node: NodeId) {
    let mut open = lock(&inner.primary.proposed);
    if let Some(n) = open.get_mut(&node) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            open.remove(&node);
        }
    }
}

/// Counts each device's proposals still waiting (at start).
pub(super) fn count_proposals(inner: &PrimaryRt) -> Result<(), NodeError> {
    let mut open: HashMap<NodeId, usize> = HashMap::new();
    for a in inner.store.load_all::<ActionRecord>()? {
        if a.state == ActionState::Proposed {
            *open.entry(a.proposed_by).or_insert(0) += 1;
        }
    }
    *lock(&inner.primary.proposed) = open;
    Ok(())
}

pub(super) fn load_policies(inner: &PrimaryRt) -> Result<(), NodeError> {
    let all: Vec<ExecPolicyRecord> = inner.store.load_all()?;
    for p in all {
        if let Err(e) = inner.policy.install(&p.node, p.document.as_str()) {
            inner.events.publish(
                "policy.invalid",
                inner.now(),
                json!({ "device": p.node.to_string(), "error": e }),
            );
        }
    }
    Ok(())
}
