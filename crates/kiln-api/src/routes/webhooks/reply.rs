//! Slack follow-ups: the end of what a slash command started, posted to
//! the command's `response_url` by a task in the receiving process.

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::json;

use crate::AppState;

/// How long a Slack command's follow-up waits for the job or run to end
/// (Slack takes answers on a `response_url` for 30 minutes).
pub const REPLY_WAIT: Duration = Duration::from_secs(29 * 60);
/// Follow-ups waiting at once in one process; past this, a command is
/// acknowledged without one.
pub const REPLIES_MAX: usize = 1000;
/// Where follow-ups may be sent unless the deployment says otherwise.
pub const SLACK_REPLY_PREFIX: &str = "https://hooks.slack.com/";

/// Lets follow-ups go to URLs starting with one of `prefixes` (each ending
/// in `/` or `:` so a host cannot be extended), instead of Slack's only.
/// Set once, at start-up; later calls change nothing.
pub fn allow_reply_urls(prefixes: Vec<String>) {
    let _ = REPLY_PREFIXES.set(prefixes);
}

static REPLY_PREFIXES: OnceLock<Vec<String>> = OnceLock::new();
pub(super) static REPLIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(REPLIES_MAX);

pub(super) fn reply_allowed(url: &str) -> bool {
    match REPLY_PREFIXES.get() {
        Some(prefixes) => prefixes.iter().any(|p| url.starts_with(p.as_str())),
        None => url.starts_with(SLACK_REPLY_PREFIX),
    }
}

pub(super) fn started_text(job_id: Option<i64>, run_id: Option<i64>) -> String {
    match (job_id, run_id) {
        (Some(id), _) => format!("job {id}"),
        (_, Some(id)) => format!("run {id}"),
        _ => "nothing".into(),
    }
}

fn reply_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // A redirect could lead anywhere the allowed prefixes do not.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Waits (bounded) for the end of what a command started and posts it to
/// the command's `response_url`. Held in this process only: a restart
/// loses the follow-ups waiting in it.
pub(super) async fn follow_up(
    _slot: tokio::sync::SemaphorePermit<'static>,
    state: Arc<AppState>,
    tenant: String,
    job_id: Option<i64>,
    run_id: Option<i64>,
    url: String,
) {
    let text = match (job_id, run_id) {
        (Some(id), _) => job_end(&state, &tenant, id).await,
        (_, Some(id)) => run_end(&state, &tenant, id).await,
        _ => None,
    }
    .unwrap_or_else(|| format!("{} is still going; see kiln.", started_text(job_id, run_id)));
    let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text});
    // The URL is a credential of Slack's: it stays out of the log.
    match reply_client().post(&url).json(&body).send().await {
        Ok(response) if response.status().is_success() => {}
        Ok(response) => {
            tracing::warn!(status = %response.status(), "a Slack follow-up was refused")
        }
        Err(error) => tracing::warn!(
            error = %error.without_url(),
            "a Slack follow-up could not be sent"
        ),
    }
}

/// Reads at most this often per waiting follow-up, however busy the log.
const REPLY_READ_EVERY: Duration = Duration::from_millis(250);
/// And at least this often, in case a wake-up was missed.
const REPLY_POLL_EVERY: Duration = Duration::from_secs(2);

/// Calls `read` until it breaks (the end as text; `None` when the job or
/// run is gone or the store fails) or [`REPLY_WAIT`] passes. Woken by the
/// event log, which every end of a job or run writes to; polled as a guard.
async fn wait_end<F, Fut>(state: &AppState, mut read: F) -> Option<String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ControlFlow<Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + REPLY_WAIT;
    let ready = state.db.events_ready();
    loop {
        // Registered before the read, so an end written meanwhile wakes us.
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let ControlFlow::Break(end) = read().await {
            return end;
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::select! {
            _ = notified => tokio::time::sleep(REPLY_READ_EVERY).await,
            _ = tokio::time::sleep(REPLY_POLL_EVERY) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// How a job ended, or `None` if it has not within [`REPLY_WAIT`].
async fn job_end(state: &AppState, tenant: &str, id: i64) -> Option<String> {
    wait_end(state, || async move {
        let job = match state.db.job_get(tenant, id).await {
            Ok(Some(job)) => job,
            _ => return ControlFlow::Break(None),
        };
        if !job.status.is_terminal() {
            return ControlFlow::Continue(());
        }
        let mut text = format!("job {id} {}", job.status.as_str());
        if let Some(result) = &job.result {
            text.push_str(&format!(" (exit code {})", result.exit_code));
            let stdout: String = result.stdout.chars().take(2000).collect();
            if !stdout.trim().is_empty() {
                text.push_str(&format!("\n```{stdout}```"));
            }
        } else if let Some(error) = &job.error {
            text.push_str(&format!(": {error}"));
        }
        ControlFlow::Break(Some(text))
    })
    .await
}

/// How a run ended, or `None` if it has not within [`REPLY_WAIT`].
async fn run_end(state: &AppState, tenant: &str, id: i64) -> Option<String> {
    wait_end(state, || async move {
        let view = match state.db.run_get(tenant, id).await {
            Ok(Some(view)) => view,
            _ => return ControlFlow::Break(None),
        };
        if !view.run.status.is_terminal() {
            return ControlFlow::Continue(());
        }
        let mut text = format!("run {id} {}", view.run.status.as_str());
        if let Some(reason) = &view.run.reason {
            text.push_str(&format!(" ({reason})"));
        }
        ControlFlow::Break(Some(text))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_ups_go_only_to_slack_by_default() {
        assert!(reply_allowed("https://hooks.slack.com/commands/T1/2/x"));
        assert!(!reply_allowed("https://hooks.slack.com.evil.example/x"));
        assert!(!reply_allowed("http://169.254.169.254/latest"));
    }
}
