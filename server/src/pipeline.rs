//! The pipeline worker: leases events from the durable queue, runs each
//! through its project's chain of transformation plugins, stores what comes
//! out once per (project, uuid), and only then removes the events from the
//! queue, so a crash at any point leaves each event either queued or stored.
//!
//! A failing plugin follows its install's policy: fail-open (the default)
//! passes the event on unchanged, fail-closed sends it to dead letters. Both
//! log the error with the event's uuid. A plugin config that fails
//! [`AUTO_DISABLE_AFTER`] events in a row is disabled with the reason shown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::configs::{self, ConfigWatch};
use crate::loader;
use crate::metrics::{FailureKind, Hook, LocalPluginMetrics, Metrics};
use crate::model::FailurePolicy;
use crate::model::Quotas;
use crate::model::quotas::Hit;
use crate::queue::{QueueGauge, Wakeups};
use crate::quotas::QuotaBook;
use crate::runtime::{LogLevel, LogRecord, PluginEvent, PluginInstance, Runtime, TransformFailure};
use crate::runtime::{PluginError, TrapReason};
use crate::store::{
    Backend, Claim, Claimed, DeadLetter, MAX_SLICES, PluginConfig, PluginHealth, ProcessedBatch,
    QueuedEvent, Store,
};
use crate::supervisor::Health;

/// Rows leased per round trip.
const CLAIM_BATCH: u32 = 500;

/// How long an idle worker waits before looking again, in case a wake-up
/// was missed (another process enqueued, or a lease expired).
const IDLE_POLL: Duration = Duration::from_millis(200);

/// How often a busy worker's claims start again from the head of the
/// queue; see [`ClaimCursor`].
const REWIND_EVERY: Duration = Duration::from_secs(1);

/// The chain time each project with events waiting earns per round of
/// the worker, while several projects have; see [`Chains::credit`].
const QUANTUM: Duration = Duration::from_millis(50);

/// The least chain time a project earns per round (see
/// [`Chains::allowance`]).
const MIN_QUANTUM: Duration = Duration::from_millis(1);

/// How often a project held back (see [`Chains::held`]) is tried again.
const HOLD_RETRY: Duration = Duration::from_secs(1);

/// Consecutive failed events after which a plugin config is disabled.
pub const AUTO_DISABLE_AFTER: i64 = 10;

/// One plugin config of a chain, instantiated.
struct Link {
    config_id: String,
    /// The install as it was started; a change starts it again.
    updated_at: String,
    fail_closed: bool,
    instance: PluginInstance,
    /// Its transform calls, counted here and flushed once per batch.
    metrics: LocalPluginMetrics,
    /// As stored; a change is written back with the batch.
    stored_failures: i64,
    failures: i64,
    disabled_reason: Option<String>,
}

/// Every project's chain, kept in step with the published configs.
#[derive(Default)]
struct Chains {
    by_project: HashMap<String, Vec<Link>>,
    /// Projects whose chain cannot run now because the host could not
    /// start or run a link (the database did not answer, the sandbox had
    /// no room), with why. Their events stay queued, and the others'
    /// go on: one project's trouble does not stall the rest.
    held: HashMap<String, String>,
    /// Each project's chain time per event, smoothed over its last batches.
    cost: HashMap<String, Duration>,
    /// Each project's chain time in hand, in microseconds, while several
    /// projects have events in a batch (deficit round robin): every round
    /// adds the project's allowance (see [`Chains::allowance`]) up to one
    /// allowance, and every event run takes what it took. A project at or
    /// below zero waits for later rounds. A project whose events take
    /// 180 ms each thereby runs one every few rounds, and the others get
    /// their rounds' worth, instead of each round waiting on it.
    credit: HashMap<String, i64>,
    /// Chain time each project spent in the last round that ran any.
    last_round: HashMap<String, Duration>,
}

impl Chains {
    /// Rebuilds the chains from `configs`, keeping the instances of
    /// installs that did not change. A plugin that cannot start by its own
    /// fault is disabled with the reason; one the host could not start
    /// holds its project's events back, so that no event runs through a
    /// chain that lacks a link (a scrubber, say) and the install stays
    /// enabled.
    async fn update(
        &mut self,
        configs: &[PluginConfig],
        store: &Store,
        runtime: &Runtime,
        metrics: &Metrics,
    ) -> anyhow::Result<()> {
        let mut running: HashMap<String, Link> = std::mem::take(&mut self.by_project)
            .into_values()
            .flatten()
            .map(|link| (link.config_id.clone(), link))
            .collect();
        let mut by_project: HashMap<String, Vec<Link>> = HashMap::new();
        let mut held = HashMap::new();
        for config in configs.iter().filter(|c| c.is_transformation()) {
            let link = match running.remove(&config.id) {
                Some(link) if link.updated_at == config.updated_at => link,
                _ => match loader::start(store, runtime, config).await {
                    Ok(instance) if !instance.plugin().manifest().is_transformation() => {
                        continue;
                    }
                    Ok(instance) => Link {
                        config_id: config.id.clone(),
                        updated_at: config.updated_at.clone(),
                        fail_closed: config.failure_policy == FailurePolicy::Closed,
                        instance,
                        metrics: metrics.plugin(config, Hook::Transform).local(),
                        stored_failures: config.consecutive_failures,
                        failures: config.consecutive_failures,
                        disabled_reason: None,
                    },
                    Err(err) if err.is_plugin_fault() => {
                        tracing::warn!(plugin_config = %config.id, "disabling plugin config: {err}");
                        store
                            .disable_plugin_config(&config.id, &err.to_string())
                            .await?;
                        continue;
                    }
                    Err(err) => {
                        if !self.held.contains_key(&config.project_id) {
                            tracing::warn!(
                                project = %config.project_id,
                                plugin_config = %config.id,
                                "holding the project's events back until its plugin can start: {err}"
                            );
                        }
                        held.insert(
                            config.project_id.clone(),
                            format!("plugin config {} could not start: {err}", config.id),
                        );
                        continue;
                    }
                },
            };
            by_project
                .entry(config.project_id.clone())
                .or_default()
                .push(link);
        }
        for project in self.held.keys() {
            if !held.contains_key(project) {
                tracing::info!(project = %project, "the project's chain runs again");
            }
        }
        self.by_project = by_project;
        self.held = held;
        Ok(())
    }
}

impl Chains {
    /// The most events of each project the next claim should take: about
    /// a [`QUANTUM`] of its chain's time for slow projects, and none for a
    /// project held back, out of credit, or with rows `carried` over from
    /// this round.
    fn slices(&self, carried: &HashSet<String>) -> HashMap<String, u32> {
        let mut slices: HashMap<String, u32> = self
            .cost
            .iter()
            .filter(|(_, cost)| !cost.is_zero())
            .map(|(project, cost)| {
                let most = (QUANTUM.as_secs_f64() / cost.as_secs_f64()).floor();
                (project.clone(), most.clamp(1.0, CLAIM_BATCH as f64) as u32)
            })
            .filter(|(_, most)| *most < CLAIM_BATCH)
            .collect();
        let out_of_credit = self
            .credit
            .iter()
            .filter(|(_, credit)| **credit <= 0)
            .map(|(project, _)| project);
        for project in self.held.keys().chain(carried).chain(out_of_credit) {
            slices.insert(project.clone(), 0);
        }
        slices
    }

    /// The chain time `project` earns per round, in microseconds: what the
    /// busiest other project spent in the last round, from
    /// [`MIN_QUANTUM`] to [`QUANTUM`], or a whole quantum when no other
    /// project ran. The others are held to the rows a claim brings them,
    /// often a few milliseconds' worth each; a fixed quantum let one
    /// project of costly events take half the worker beside nine cheap
    /// ones, where this holds it to about what each of them gets.
    fn allowance(&self, project: &str) -> i64 {
        let busiest_other = self
            .last_round
            .iter()
            .filter(|(other, _)| other.as_str() != project)
            .map(|(_, spent)| *spent)
            .max();
        busiest_other
            .map_or(QUANTUM, |spent| spent.clamp(MIN_QUANTUM, QUANTUM))
            .as_micros() as i64
    }

    /// Adds a round's allowance to every project's credit; a project back
    /// to a full allowance needs no entry.
    fn refill(&mut self) {
        let allowances: HashMap<String, i64> = self
            .credit
            .keys()
            .map(|project| (project.clone(), self.allowance(project)))
            .collect();
        self.credit.retain(|project, credit| {
            let allowance = allowances[project];
            *credit = (*credit + allowance).min(allowance);
            *credit < allowance
        });
    }

    /// Starts again the links that held their projects back.
    async fn retry(
        &mut self,
        store: &Store,
        runtime: &Runtime,
        metrics: &Metrics,
        configs: &mut watch::Receiver<Option<configs::Snapshot>>,
    ) -> anyhow::Result<()> {
        let snapshot = configs.borrow().clone();
        match snapshot {
            Some(snapshot) => self.update(&snapshot, store, runtime, metrics).await,
            None => Ok(()),
        }
    }
}

fn to_plugin_event(event: QueuedEvent) -> PluginEvent {
    PluginEvent {
        uuid: event.uuid,
        name: event.event,
        distinct_id: event.distinct_id,
        timestamp: event.timestamp,
        properties: event.properties,
    }
}

fn to_queued(event: PluginEvent, received_at: &str) -> QueuedEvent {
    QueuedEvent {
        uuid: event.uuid,
        event: event.name,
        distinct_id: event.distinct_id,
        timestamp: event.timestamp,
        received_at: received_at.to_string(),
        properties: event.properties,
    }
}

/// Runs claimed events through their projects' chains. CPU-bound: called on
/// a blocking thread. Events of a project whose chain cannot run now (see
/// [`Chains::held`]), or that is out of credit (see [`Chains::credit`]), are
/// left out of the batch and returned in `deferred`, to stay queued.
fn process(chains: &mut Chains, claimed: Vec<Claimed>, quotas: &QuotaBook) -> Outcome {
    let mut outcome = Outcome::default();
    let mut spent: HashMap<String, (u32, Duration)> = HashMap::new();
    chains.refill();
    let mut allowances: HashMap<String, i64> = HashMap::new();
    let mut waited_for_credit = false;
    for row in claimed {
        // A held project's rows, and the rows of a project out of credit,
        // wait for a later round: one slow project (or one whose cost is
        // not known yet) must not hold the batch, and every other
        // project's events in it.
        let credit = chains.credit.get(&row.project_id).copied();
        let out_of_credit = credit.is_some_and(|credit| credit <= 0);
        if chains.held.contains_key(&row.project_id) || out_of_credit {
            waited_for_credit |= out_of_credit;
            outcome.deferred.push(row);
            continue;
        }
        let Claimed {
            id,
            project_id,
            event,
        } = row;
        outcome.done.push(id);
        outcome.count_done(&project_id);
        let batch = &mut outcome.batch;
        let Some(chain) = chains.by_project.get_mut(&project_id) else {
            batch.events.push((project_id, event));
            continue;
        };
        let quota = quotas.get(&project_id);
        let started = Instant::now();
        let end = run_chain(chain, &project_id, event, &quota, batch);
        let took = started.elapsed();
        let spent = spent
            .entry(project_id.clone())
            .or_insert((0u32, Duration::ZERO));
        spent.0 += 1;
        spent.1 += took;
        let allowance = *allowances
            .entry(project_id.clone())
            .or_insert_with(|| chains.allowance(&project_id));
        *chains.credit.entry(project_id.clone()).or_insert(allowance) -= took.as_micros() as i64;
        match end {
            ChainEnd::Done => {}
            ChainEnd::Wait(reason) => {
                // The host had no room for a link: the row stays queued,
                // and whatever the chain made of it so far is dropped, to
                // be made again when it runs. The chain consumed the
                // event, so the row is read again from the queue.
                outcome.done.pop();
                outcome.uncount_done(&project_id);
                outcome.reread.push(id);
                chains.held.insert(project_id, reason);
            }
        }
    }
    if waited_for_credit && outcome.done.is_empty() {
        // Nothing ran: no other project wanted the worker, so those out
        // of credit may have it, from the next round on.
        chains.credit.clear();
    }
    if !spent.is_empty() {
        chains.last_round = spent
            .iter()
            .map(|(p, (_, time))| (p.clone(), *time))
            .collect();
    }
    for (project_id, (events, time)) in spent {
        let per_event = time / events;
        let cost = chains.cost.entry(project_id).or_insert(per_event);
        *cost = (*cost * 3 + per_event) / 4;
    }
    for link in chains.by_project.values_mut().flatten() {
        link.metrics.flush();
        let (logs, _) = link.instance.take_activity();
        outcome.batch.logs.extend(
            logs.into_iter()
                .map(|record| (link.config_id.clone(), record)),
        );
        if link.failures != link.stored_failures || link.disabled_reason.is_some() {
            outcome.batch.health.push(PluginHealth {
                plugin_config_id: link.config_id.clone(),
                consecutive_failures: link.failures,
                disabled_reason: link.disabled_reason.clone(),
            });
            link.stored_failures = link.failures;
        }
    }
    outcome
}

/// What [`process`] made of a claimed batch.
#[derive(Default)]
struct Outcome {
    /// Rows whose events are in `batch`: removed when it is stored.
    done: Vec<i64>,
    /// Rows left for a later round: their projects are held back, or had
    /// their time in this batch.
    deferred: Vec<Claimed>,
    /// Rows left queued whose events a chain consumed before it had to
    /// wait, to be read from the queue again.
    reread: Vec<i64>,
    /// How many of `done` each project has, for the queue's gauge.
    done_per_project: HashMap<String, usize>,
    batch: ProcessedBatch,
}

impl Outcome {
    fn count_done(&mut self, project_id: &str) {
        match self.done_per_project.get_mut(project_id) {
            Some(n) => *n += 1,
            None => {
                self.done_per_project.insert(project_id.to_string(), 1);
            }
        }
    }

    fn uncount_done(&mut self, project_id: &str) {
        if let Some(n) = self.done_per_project.get_mut(project_id) {
            *n -= 1;
        }
    }
}

enum ChainEnd {
    Done,
    /// A link had no room to run (see `PluginError::Exhausted`).
    Wait(String),
}

/// Runs one captured event through its project's chain, adding what comes
/// out (events, dead letters, log lines) to `batch`.
fn run_chain(
    chain: &mut [Link],
    project_id: &str,
    event: QueuedEvent,
    quota: &Quotas,
    batch: &mut ProcessedBatch,
) -> ChainEnd {
    let received_at = event.received_at.clone();
    let budget = Duration::from_millis(quota.chain_time_ms);
    let max_events = quota.events_per_input as usize;
    // Kept only where the chain could go over the quota, to dead-letter
    // as it came: the first link consumes it.
    let most = chain
        .iter()
        .filter(|link| link.disabled_reason.is_none())
        .fold(1usize, |n, link| {
            n.saturating_mul(link.instance.limits().max_output_events as usize)
        });
    let input = to_plugin_event(event);
    let original = (most > max_events).then(|| input.clone());
    let started = Instant::now();
    let mut current = vec![input];
    for link in chain
        .iter_mut()
        .filter(|link| link.disabled_reason.is_none())
    {
        let mut next = Vec::with_capacity(current.len());
        for event in current {
            if link.disabled_reason.is_some() {
                // The rest of this event's copies skip the plugin that
                // was just disabled, as later events will.
                next.push(event);
                continue;
            }
            let left = budget.saturating_sub(started.elapsed());
            let deadline = link.instance.limits().transform_deadline;
            let call_started = Instant::now();
            // A failure hands the input back unchanged, for fail-open to
            // pass on and fail-closed to dead-letter.
            let result = link.instance.transform_within(event, left);
            let took = call_started.elapsed();
            let failure = result
                .as_ref()
                .err()
                .map(|failure| FailureKind::of(&failure.error));
            link.metrics.record(took, failure);
            match result {
                Ok(out) => {
                    if took * 2 > deadline {
                        link.count_failure(
                            format!(
                                "a transform call took {} ms of its {} ms deadline; calls that keep running near their deadline count as failures",
                                took.as_millis(),
                                deadline.as_millis()
                            ),
                        );
                    } else {
                        link.failures = 0;
                    }
                    next.extend(out);
                }
                Err(failure) => {
                    let TransformFailure {
                        error: err,
                        input: event,
                    } = *failure;
                    if err.is_exhausted() {
                        return ChainEnd::Wait(err.to_string());
                    }
                    let mut message = err.to_string();
                    if left < deadline
                        && matches!(
                            &err,
                            PluginError::Trapped {
                                reason: TrapReason::Deadline(_),
                                ..
                            }
                        )
                    {
                        message.push_str(&format!(
                            " (the chain's time for this event ran out: quota `chain_time_ms`, {} ms)",
                            quota.chain_time_ms
                        ));
                    }
                    batch.logs.push((
                        link.config_id.clone(),
                        LogRecord {
                            at: crate::store::now_rfc3339(),
                            level: LogLevel::Error,
                            message: format!(
                                "{message} (event {}: {})",
                                if link.fail_closed {
                                    "sent to dead letters"
                                } else {
                                    "passed on unchanged"
                                },
                                event.uuid
                            ),
                            fields: Vec::new(),
                            event_uuid: Some(event.uuid.clone()),
                        },
                    ));
                    if link.fail_closed {
                        batch.dead_letters.push(DeadLetter {
                            project_id: project_id.to_string(),
                            plugin_config_id: link.config_id.clone(),
                            event: serde_json::to_value(&event).unwrap_or(Value::Null),
                            error: message.clone(),
                        });
                    } else {
                        next.push(event);
                    }
                    link.count_failure(message);
                }
            }
            if next.len() > max_events {
                let input = original.expect("kept when the chain can go over the quota");
                let error = format!(
                    "the chain made more than {max_events} events of event {} (at plugin config {}); the event is dead-lettered whole: {}",
                    input.uuid,
                    link.config_id,
                    Hit {
                        quota: "events_per_input",
                        limit: max_events as u64
                    }
                );
                batch.logs.push((
                    link.config_id.clone(),
                    LogRecord {
                        at: crate::store::now_rfc3339(),
                        level: LogLevel::Error,
                        message: error.clone(),
                        fields: Vec::new(),
                        event_uuid: Some(input.uuid.clone()),
                    },
                ));
                batch.dead_letters.push(DeadLetter {
                    project_id: project_id.to_string(),
                    plugin_config_id: link.config_id.clone(),
                    event: serde_json::to_value(&input).unwrap_or(Value::Null),
                    error,
                });
                return ChainEnd::Done;
            }
        }
        current = next;
        if current.is_empty() {
            break;
        }
    }
    batch.events.extend(
        current
            .into_iter()
            .map(|e| (project_id.to_string(), to_queued(e, &received_at))),
    );
    ChainEnd::Done
}

impl Link {
    /// Counts one failed (or too slow) call towards disabling the link.
    fn count_failure(&mut self, message: String) {
        self.failures += 1;
        if self.failures >= AUTO_DISABLE_AFTER && self.disabled_reason.is_none() {
            self.disabled_reason = Some(format!(
                "disabled after {AUTO_DISABLE_AFTER} consecutive failed events; the last: {message}"
            ));
        }
    }
}

/// Where the next claim starts: per project, forward from the last
/// claimed id, and back to the start now and then (see [`Claim::after`]).
///
/// On PostgreSQL rows can appear behind the cursor at any time (another
/// process gives rows back, a lease runs out, a capture transaction commits
/// after a later one), so the cursor goes back every [`REWIND_EVERY`];
/// leased rows are skipped, so going back never takes a batch twice. On
/// SQLite one process writes, and ids are handed out in commit order, so
/// rows fall behind the cursor only when storing a batch failed (rows left
/// for later are carried in memory, see [`keep_for_later`]), and the
/// cursor goes back only when the queue ahead of it is empty: with leases
/// kept in memory, going back while a batch is in flight would take it
/// again.
struct ClaimCursor {
    after: HashMap<String, i64>,
    /// See [`Chains::slices`]; as of the last processed batch.
    most: HashMap<String, u32>,
    from_project: String,
    rewound_at: Instant,
    periodic: bool,
}

impl ClaimCursor {
    fn new(backend: Backend) -> Self {
        ClaimCursor {
            after: HashMap::new(),
            most: HashMap::new(),
            from_project: String::new(),
            rewound_at: Instant::now(),
            periodic: backend == Backend::Postgres,
        }
    }

    fn next(&mut self, lease: Duration) -> Claim {
        if self.periodic && self.rewound_at.elapsed() >= REWIND_EVERY {
            self.rewind();
        }
        Claim {
            limit: CLAIM_BATCH,
            lease,
            after: self.after.clone(),
            from_project: self.from_project.clone(),
            most: self.most.clone(),
        }
    }

    fn advance(&mut self, claimed: &[Claimed]) {
        let mut projects = std::collections::HashSet::new();
        for row in claimed {
            let after = self.after.entry(row.project_id.clone()).or_insert(0);
            *after = (*after).max(row.id);
            projects.insert(row.project_id.as_str());
        }
        // With more projects waiting than one claim takes, the next claim
        // starts after the last one this claim reached.
        self.from_project = match projects.iter().max() {
            Some(last) if projects.len() >= MAX_SLICES => last.to_string(),
            _ => String::new(),
        };
    }

    /// Returns whether there was anything behind the cursor to go back to.
    fn rewind(&mut self) -> bool {
        self.rewound_at = Instant::now();
        self.from_project.clear();
        let had = !self.after.is_empty();
        self.after.clear();
        had
    }
}

/// A batch that has been through the chains, waiting to be stored.
struct Processed {
    ids: Vec<i64>,
    /// How many of `ids` each project has.
    per_project: HashMap<String, usize>,
    batch: ProcessedBatch,
    chain_time: Duration,
}

/// What the worker needs: the queue and the tables it stores into, the
/// plugins, and the signals it shares with capture and delivery.
#[derive(Clone)]
pub struct Worker {
    pub store: Store,
    pub runtime: Runtime,
    pub configs: ConfigWatch,
    pub queue: Arc<QueueGauge>,
    pub wake: Wakeups,
    /// How long claimed rows stay with this worker.
    pub lease: Duration,
    pub quotas: QuotaBook,
    pub metrics: Arc<Metrics>,
}

/// The worker: each round runs one claimed batch through the chains on a
/// blocking thread while, at the same time, one transaction stores the
/// batch processed in the round before and leases the next. Batches are
/// stored in the order they were claimed, and the chains and the database
/// keep both cores busy.
///
/// A store error ends the worker, after it gives its leases back: nothing
/// it held is lost, and its supervisor reports it and starts it again.
pub async fn run_worker(
    worker: Worker,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let owner = format!("worker-{}", uuid::Uuid::new_v4());
    let result = work(&worker, &owner, &health, &mut stop).await;
    if let Err(err) = worker.store.release(&owner).await {
        tracing::error!("failed to give back queued rows: {err}; their lease will run out");
    }
    result
}

async fn work(
    worker: &Worker,
    owner: &str,
    health: &Health,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let store = &worker.store;
    let mut configs = worker.configs.subscribe();
    let Some(snapshot) = configs::first(&mut configs, stop).await else {
        return Ok(());
    };
    let mut chains = Chains::default();
    chains
        .update(&snapshot, store, &worker.runtime, &worker.metrics)
        .await?;
    let mut cursor = ClaimCursor::new(store.backend());
    let mut claimed: Vec<Claimed> = Vec::new();
    let mut processed: Option<Processed> = None;
    let mut held_since = Instant::now();
    // Projects with rows carried over to the next round (see
    // `keep_for_later`): not claimed again until those are done.
    let mut carried_projects: HashSet<String> = HashSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        // Applied while idle too, so a plugin starts (and a bad one is
        // found) when it is installed, not with the next event.
        if let Some(snapshot) = configs::newer(&mut configs) {
            chains
                .update(&snapshot, store, &worker.runtime, &worker.metrics)
                .await?;
        }
        // Projects held back are tried again now and then, as their
        // trouble (a full pool, a database blip) may have passed; idle
        // too, since their rows are not claimed while they wait.
        if !chains.held.is_empty() && held_since.elapsed() >= HOLD_RETRY {
            chains
                .retry(store, &worker.runtime, &worker.metrics, &mut configs)
                .await?;
            held_since = Instant::now();
            cursor.most = chains.slices(&carried_projects);
        }
        if claimed.is_empty() && processed.is_none() {
            claimed = store.claim(owner, &cursor.next(worker.lease)).await?;
            if claimed.is_empty() && !chains.credit.is_empty() {
                // Nothing else to run: projects out of credit have the
                // worker to themselves.
                chains.credit.clear();
                cursor.most = chains.slices(&carried_projects);
                continue;
            }
            if claimed.is_empty() {
                // An empty queue read is a round of work done.
                health.ready();
                if cursor.rewind() {
                    continue;
                }
                tokio::select! {
                    _ = worker.wake.worker.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => {}
                    // Waking marks the change seen; the top of the loop must still see it.
                    _ = configs.changed() => configs.mark_changed(),
                }
                continue;
            }
            cursor.advance(&claimed);
        }

        // Again after the claim: every batch was claimed before this check,
        // so a config change the API answered before an event was captured
        // applies to that event.
        if let Some(snapshot) = configs::newer(&mut configs) {
            chains
                .update(&snapshot, store, &worker.runtime, &worker.metrics)
                .await?;
        }
        let to_process = std::mem::take(&mut claimed);
        let quotas = worker.quotas.clone();
        let processing = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome =
                (!to_process.is_empty()).then(|| process(&mut chains, to_process, &quotas));
            (chains, outcome, started.elapsed())
        });
        let next = cursor.next(worker.lease);
        let storing = processed.is_some();
        let stored = match processed.take() {
            Some(done) => store_batch(worker, owner, &done, Some(&next))
                .await
                .map_err(|err| {
                    anyhow::anyhow!(
                        "failed to store {} events of {} queued rows: {err}; they stay queued",
                        done.batch.events.len(),
                        done.ids.len()
                    )
                }),
            // Nothing to store yet: lease the next batch on its own, so the
            // next round has both a batch to process and one to store.
            None => store
                .claim(owner, &next)
                .await
                .map_err(|err| anyhow::anyhow!("failed to lease queued events: {err}")),
        };
        let (returned, outcome, chain_time) = processing.await?;
        chains = returned;
        let mut carried = Vec::new();
        let mut only_waiting = false;
        processed = match outcome {
            Some(outcome) => {
                // Only rows of held-back projects: nothing will change
                // before the next retry.
                only_waiting = outcome.done.is_empty()
                    && outcome
                        .deferred
                        .iter()
                        .all(|row| chains.held.contains_key(&row.project_id));
                carried = keep_for_later(worker, owner, outcome.deferred, outcome.reread).await?;
                (!outcome.done.is_empty()).then_some(Processed {
                    ids: outcome.done,
                    per_project: outcome.done_per_project,
                    batch: outcome.batch,
                    chain_time,
                })
            }
            None => None,
        };
        carried_projects = carried.iter().map(|row| row.project_id.clone()).collect();
        cursor.most = chains.slices(&carried_projects);
        let next_batch = stored?;
        if storing {
            // Ready means storing works, not only claiming: a worker that
            // claims and then fails every batch is not.
            health.ready();
        }
        cursor.advance(&next_batch);
        // Rows kept from this round go first, in the order they were
        // claimed.
        carried.extend(next_batch);
        claimed = carried;
        if only_waiting && processed.is_none() {
            // Nothing but rows that wait (for a held-back project): wait
            // rather than look at them again at once.
            tokio::select! {
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => {}
            }
        }
    }
    if let Some(done) = processed.take()
        && let Err(err) = store_batch(worker, owner, &done, None).await
    {
        tracing::error!(
            "failed to store the last {} events before stopping: {err}; they stay queued",
            done.batch.events.len()
        );
    }
    Ok(())
}

/// Keeps the rows a round left for later (see [`Outcome::deferred`] and
/// [`Outcome::reread`]) queued. On SQLite, where this worker's leases live
/// in memory, they are carried to the next round, and the rows a chain
/// consumed are read again; on PostgreSQL their leases are given back, and
/// a later claim takes them again in order.
async fn keep_for_later(
    worker: &Worker,
    owner: &str,
    deferred: Vec<Claimed>,
    reread: Vec<i64>,
) -> anyhow::Result<Vec<Claimed>> {
    match worker.store.backend() {
        Backend::Sqlite => {
            let mut carried = deferred;
            if !reread.is_empty() {
                let again = worker.store.queued_rows(&reread).await.map_err(|err| {
                    anyhow::anyhow!(
                        "failed to read {} held-back queue rows again: {err}",
                        reread.len()
                    )
                })?;
                carried.extend(again);
                carried.sort_by_key(|row| row.id);
            }
            Ok(carried)
        }
        Backend::Postgres => {
            let ids: Vec<i64> = deferred.iter().map(|row| row.id).chain(reread).collect();
            if !ids.is_empty() {
                let (store, owner) = (worker.store.clone(), owner.to_string());
                tokio::spawn(async move {
                    if let Err(err) = store.release_rows(&owner, &ids).await {
                        tracing::warn!(
                            "failed to give back {} queue rows left for later: {err}; their lease will run out",
                            ids.len()
                        );
                    }
                });
            }
            Ok(Vec::new())
        }
    }
}

/// Stores a processed batch and, with `next`, leases the next one in the
/// same transaction.
async fn store_batch(
    worker: &Worker,
    owner: &str,
    done: &Processed,
    next: Option<&Claim>,
) -> crate::store::Result<Vec<Claimed>> {
    let started = Instant::now();
    let claimed = worker
        .store
        .complete(owner, &done.ids, &done.batch, next)
        .await?;
    stored(worker, done, started);
    Ok(claimed)
}

fn stored(worker: &Worker, done: &Processed, started: Instant) {
    // Chains and storing overlap, so a round takes the longer of the two.
    let round = started.elapsed().max(done.chain_time);
    worker.queue.removed_in(&done.per_project, round);
    // Only a round with a large batch says what the pipeline can do: a
    // small one means it keeps up, and its fixed costs would make the
    // pipeline look slower than it is.
    if done.ids.len() >= CLAIM_BATCH as usize / 2 {
        worker.queue.record_round(done.ids.len(), round);
    }
    worker.wake.delivery.notify_waiters();
    tracing::debug!(
        rows = done.ids.len(),
        events = done.batch.events.len(),
        chain_ms = done.chain_time.as_secs_f64() * 1000.0,
        store_ms = started.elapsed().as_secs_f64() * 1000.0,
        "stored a batch"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_project_gets_a_slice_of_about_the_same_time_as_the_others() {
        let mut chains = Chains::default();
        chains
            .cost
            .insert("slow".into(), Duration::from_millis(180));
        chains
            .cost
            .insert("middling".into(), Duration::from_millis(2));
        chains.cost.insert("fast".into(), Duration::from_micros(20));
        let slices = chains.slices(&HashSet::new());
        assert_eq!(slices.get("slow"), Some(&1));
        assert_eq!(slices.get("middling"), Some(&25));
        assert_eq!(
            slices.get("fast"),
            None,
            "a fast chain takes its full share"
        );
    }

    #[test]
    fn a_costly_project_earns_about_what_the_busiest_other_spent() {
        let mut chains = Chains::default();
        assert_eq!(chains.allowance("alone"), 50_000, "no one else: a quantum");
        chains.last_round = [
            ("cheap-a", Duration::from_millis(6)),
            ("cheap-b", Duration::from_millis(5)),
            ("costly", Duration::from_millis(50)),
        ]
        .into_iter()
        .map(|(p, t)| (p.to_string(), t))
        .collect();
        assert_eq!(chains.allowance("costly"), 6_000);
        assert_eq!(chains.allowance("cheap-a"), 50_000);
        chains.last_round = [("cheap", Duration::from_micros(10))]
            .into_iter()
            .map(|(p, t)| (p.to_string(), t))
            .collect();
        assert_eq!(chains.allowance("costly"), 1_000, "at least MIN_QUANTUM");
        // A costly event overdraws its credit by far; the rounds refill it
        // by the allowance, so it waits in proportion.
        chains.credit.insert("costly".into(), 1_000 - 20_000);
        for _ in 0..19 {
            chains.refill();
            assert_eq!(chains.slices(&HashSet::new()).get("costly"), Some(&0));
        }
        chains.refill();
        assert_eq!(chains.slices(&HashSet::new()).get("costly"), None);
    }

    #[test]
    fn a_project_out_of_credit_is_not_claimed_until_rounds_refill_it() {
        let mut chains = Chains::default();
        chains.credit.insert("slow".into(), -120_000);
        assert_eq!(chains.slices(&HashSet::new()).get("slow"), Some(&0));
        chains.refill();
        chains.refill();
        assert_eq!(chains.slices(&HashSet::new()).get("slow"), Some(&0));
        chains.refill();
        assert_eq!(chains.slices(&HashSet::new()).get("slow"), None);
        chains.refill();
        assert!(chains.credit.is_empty(), "a full quantum needs no entry");
    }
}
