//! Execution history (migration 0011): one row per command run in a VM,
//! written `running` at its start and finished at its end.

use kiln_core::Millis;

use crate::{Db, DbError, DbResult};

/// A command as it starts. Env values and stdin are never here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecutionStart {
    pub tenant: String,
    pub vm_id: String,
    /// `api`, `websocket` or `job`.
    pub source: String,
    pub job_id: Option<i64>,
    /// The key id, or `job:<id>`.
    pub actor: String,
    pub command: String,
    pub args: Vec<String>,
    pub env_names: Vec<String>,
    pub cwd: Option<String>,
    pub started_at: Millis,
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecutionEnd {
    /// `exited`, `error` (the VM or its agent failed) or `abandoned` (the
    /// caller left or the job was killed: the command was killed).
    pub status: String,
    pub finished_at: Millis,
    pub duration_ms: i64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub truncated: bool,
    /// The first bytes of each stream, bounded by the caller.
    pub stdout_head: String,
    pub stderr_head: String,
    pub output_ref: Option<String>,
    pub error: Option<String>,
}

/// One row as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Execution {
    pub id: i64,
    pub start: ExecutionStart,
    /// `running` until the end is written.
    pub status: String,
    pub end: Option<ExecutionEnd>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant: String,
    vm_id: String,
    source: String,
    job_id: Option<i64>,
    actor: String,
    command: String,
    args: String,
    env_names: String,
    cwd: Option<String>,
    status: String,
    started_at: i64,
    finished_at: Option<i64>,
    duration_ms: Option<i64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout_bytes: i64,
    stderr_bytes: i64,
    truncated: bool,
    stdout_head: String,
    stderr_head: String,
    output_ref: Option<String>,
    error: Option<String>,
}

impl From<Row> for Execution {
    fn from(r: Row) -> Execution {
        let end = r.finished_at.map(|finished_at| ExecutionEnd {
            status: r.status.clone(),
            finished_at,
            duration_ms: r.duration_ms.unwrap_or(0),
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            stdout_bytes: r.stdout_bytes,
            stderr_bytes: r.stderr_bytes,
            truncated: r.truncated,
            stdout_head: r.stdout_head,
            stderr_head: r.stderr_head,
            output_ref: r.output_ref,
            error: r.error,
        });
        Execution {
            id: r.id,
            start: ExecutionStart {
                tenant: r.tenant,
                vm_id: r.vm_id,
                source: r.source,
                job_id: r.job_id,
                actor: r.actor,
                command: r.command,
                args: serde_json::from_str(&r.args).unwrap_or_default(),
                env_names: serde_json::from_str(&r.env_names).unwrap_or_default(),
                cwd: r.cwd,
                started_at: r.started_at,
            },
            status: r.status,
            end,
        }
    }
}

const COLUMNS: &str = "id, tenant, vm_id, source, job_id, actor, command, args, env_names, cwd, \
    status, started_at, finished_at, duration_ms, exit_code, signal, timed_out, stdout_bytes, \
    stderr_bytes, truncated, stdout_head, stderr_head, output_ref, error";

/// PostgreSQL refuses NUL in text; the guest's output may hold any byte.
fn text(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

impl Db {
    /// Records a command's start; the id is for [`Db::execution_finish`].
    pub async fn execution_start(&self, s: &ExecutionStart) -> DbResult<i64> {
        let sql =
            "INSERT INTO vm_executions (tenant, vm_id, source, job_id, actor, command, args, \
                   env_names, cwd, status, started_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'running', $10) RETURNING id";
        let args =
            text(&serde_json::to_string(&s.args).map_err(|e| DbError::Corrupt(e.to_string()))?);
        let env_names = text(
            &serde_json::to_string(&s.env_names).map_err(|e| DbError::Corrupt(e.to_string()))?,
        );
        let (command, cwd) = (text(&s.command), s.cwd.as_deref().map(text));
        Ok(crate::with_pool!(self, write, |pool| {
            sqlx::query_scalar(sql)
                .bind(&s.tenant)
                .bind(&s.vm_id)
                .bind(&s.source)
                .bind(s.job_id)
                .bind(&s.actor)
                .bind(&command)
                .bind(&args)
                .bind(&env_names)
                .bind(&cwd)
                .bind(s.started_at)
                .fetch_one(pool)
                .await?
        }))
    }

    /// Records a command's end; only a `running` row changes.
    pub async fn execution_finish(&self, id: i64, e: &ExecutionEnd) -> DbResult<bool> {
        let sql = "UPDATE vm_executions SET status = $2, finished_at = $3, duration_ms = $4, \
                   exit_code = $5, signal = $6, timed_out = $7, stdout_bytes = $8, \
                   stderr_bytes = $9, truncated = $10, stdout_head = $11, stderr_head = $12, \
                   output_ref = $13, error = $14 WHERE id = $1 AND status = 'running'";
        let (stdout, stderr) = (text(&e.stdout_head), text(&e.stderr_head));
        let error = e.error.as_deref().map(text);
        let changed = crate::with_pool!(self, write, |pool| {
            sqlx::query(sql)
                .bind(id)
                .bind(&e.status)
                .bind(e.finished_at)
                .bind(e.duration_ms)
                .bind(e.exit_code)
                .bind(e.signal)
                .bind(e.timed_out)
                .bind(e.stdout_bytes)
                .bind(e.stderr_bytes)
                .bind(e.truncated)
                .bind(&stdout)
                .bind(&stderr)
                .bind(&e.output_ref)
                .bind(&error)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }

    /// A VM's executions, newest first, before the id `before` when given.
    pub async fn execution_list(
        &self,
        tenant: &str,
        vm_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> DbResult<Vec<Execution>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM vm_executions WHERE tenant = $1 AND vm_id = $2 \
             AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        let rows = crate::with_pool!(self, read, |pool| {
            sqlx::query_as::<_, Row>(&sql)
                .bind(tenant)
                .bind(vm_id)
                .bind(before)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(Execution::from).collect())
    }

    /// True when the tenant has any execution recorded on the VM.
    pub async fn execution_any(&self, tenant: &str, vm_id: &str) -> DbResult<bool> {
        Ok(!self
            .execution_list(tenant, vm_id, None, 1)
            .await?
            .is_empty())
    }

    pub async fn execution_get(
        &self,
        tenant: &str,
        vm_id: &str,
        id: i64,
    ) -> DbResult<Option<Execution>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM vm_executions WHERE tenant = $1 AND vm_id = $2 AND id = $3"
        );
        let row = crate::with_pool!(self, read, |pool| {
            sqlx::query_as::<_, Row>(&sql)
                .bind(tenant)
                .bind(vm_id)
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(Execution::from))
    }

    /// Retention: at most `batch` executions that started before `before`.
    pub async fn execution_delete_before(&self, before: Millis, batch: i64) -> DbResult<u64> {
        let sql = "DELETE FROM vm_executions WHERE id IN \
                   (SELECT id FROM vm_executions WHERE started_at < $1 ORDER BY id LIMIT $2)";
        let deleted = crate::with_pool!(self, write, |pool| {
            sqlx::query(sql)
                .bind(before)
                .bind(batch)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }
}
