//! Events of the shard owners: rules, plugins, and what the shard worker
//! skips.

use super::{names, InternalEvent};
use fluxmesh_mesh::error_chain;
use metrics::counter;
use std::error::Error;

/// A stored rule that is not run: unreadable, or refused by this node's
/// compiler.
#[derive(Debug)]
pub struct RuleNotLoaded<'a> {
    /// The bucket key or the rule id.
    pub rule: &'a str,
    pub error: &'a dyn Error,
    pub message: &'static str,
}

impl InternalEvent for RuleNotLoaded<'_> {
    fn emit(self) {
        counter!(names::RULE_LOAD_ERRORS_TOTAL).increment(1);
        tracing::warn!(rule = %self.rule, error = %error_chain(self.error), "{}", self.message);
    }
}

/// A rule run failed on one message (an `error` frame records it).
#[derive(Debug)]
pub struct RuleFailed<'a> {
    pub rule: &'a str,
    pub input: fluxmesh_schemas::frame::FrameId,
    pub reason: &'static str,
    pub error: &'a dyn Error,
}

impl InternalEvent for RuleFailed<'_> {
    fn emit(self) {
        counter!(names::RULE_ERRORS_TOTAL, "rule" => self.rule.to_owned(), "reason" => self.reason).increment(1);
        tracing::debug!(rule = %self.rule, input = %self.input, error = %error_chain(self.error), "rule failed");
    }
}

/// A stored plugin not loaded on this node (or its metadata unreadable).
#[derive(Debug)]
pub struct PluginNotLoaded<'a> {
    /// `None`: the metadata naming it was unreadable.
    pub plugin: Option<&'a str>,
    pub error: &'a dyn Error,
}

impl InternalEvent for PluginNotLoaded<'_> {
    fn emit(self) {
        counter!(names::PLUGIN_LOAD_ERRORS_TOTAL).increment(1);
        match self.plugin {
            Some(plugin) => tracing::warn!(%plugin, error = %error_chain(self.error), "stored plugin not loaded"),
            None => {
                tracing::warn!(error = %error_chain(self.error), "unreadable plugin metadata in the store; skipped")
            }
        }
    }
}

/// What a shard worker skipped so that its shard is not blocked.
#[derive(Debug)]
pub struct ShardInputSkipped<'a> {
    pub shard: u32,
    /// `corrupt_frame` (a stored message) or `bad_checkpoint` (one
    /// device's checkpointed state: the device starts afresh).
    pub reason: &'static str,
    /// The subject or device concerned.
    pub what: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for ShardInputSkipped<'_> {
    fn emit(self) {
        counter!(names::SHARD_BAD_MESSAGES_TOTAL, "reason" => self.reason).increment(1);
        tracing::warn!(shard = self.shard, reason = self.reason, what = %self.what, error = %error_chain(self.error),
            "shard input skipped");
    }
}

/// A command a rule sent was answered (`status`), or not (`no_answer`).
#[derive(Debug)]
pub struct RuleCommandSettled<'a> {
    pub device: &'a str,
    pub id: fluxmesh_schemas::frame::FrameId,
    pub status: String,
    pub error: Option<&'a dyn Error>,
}

impl InternalEvent for RuleCommandSettled<'_> {
    fn emit(self) {
        if let Some(e) = self.error {
            tracing::warn!(device = %self.device, id = %self.id, error = %error_chain(e), "command from a rule got no answer");
        }
        counter!(names::RULE_COMMANDS_TOTAL, "status" => self.status).increment(1);
    }
}
