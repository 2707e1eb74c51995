//! Users, their sessions and the login failure counters (migration 0019).
//! Password hashes are stored as given (argon2id PHC strings made by the
//! API); this module never sees a password.

use kiln_core::users::{FailureCount, Role};
use kiln_core::Millis;

use crate::audit::note::Change;
use crate::{storable, Db, DbError, DbResult};

/// Most users one tenant lists.
pub const USER_LIST_MAX: i64 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub tenant: String,
    pub username: String,
    pub role: Role,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// One login's session: its token names `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub source: String,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    tenant: String,
    username: String,
    role: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = DbError;

    fn try_from(r: UserRow) -> DbResult<User> {
        Ok(User {
            role: Role::parse(&r.role)
                .ok_or_else(|| DbError::Corrupt(format!("role {}", r.role)))?,
            tenant: r.tenant,
            username: r.username,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct CountRow {
    key: String,
    failures: i64,
    window_start: i64,
    last_at: i64,
    locked_until: Option<i64>,
}

impl CountRow {
    fn count(&self) -> FailureCount {
        FailureCount {
            failures: self.failures,
            window_start: self.window_start,
            last_at: self.last_at,
            locked_until: self.locked_until,
        }
    }
}

const USER_COLUMNS: &str = "tenant, username, role, created_at, updated_at";

/// Ends every live session of one user (in the transaction of the change
/// that calls for it).
const REVOKE_USER_SESSIONS: &str = "UPDATE user_sessions SET revoked_at = $3 \
     WHERE tenant = $1 AND username = $2 AND revoked_at IS NULL";

impl Db {
    /// Adds a user; false if the tenant already has one of that name.
    pub async fn user_insert(&self, user: &User, password_hash: &str) -> DbResult<bool> {
        storable("tenant", &user.tenant)?;
        storable("username", &user.username)?;
        let insert = "INSERT INTO users \
             (tenant, username, role, password_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, username) DO NOTHING";
        let resource = format!("/api/v1/users/{}", user.username);
        let done = crate::audit::audited_tx!(self, |tx| {
            let n = sqlx::query(insert)
                .bind(&user.tenant)
                .bind(&user.username)
                .bind(user.role.as_str())
                .bind(password_hash)
                .bind(user.created_at)
                .bind(user.updated_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 1 {
                crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
            }
            n
        });
        Ok(done == 1)
    }

    pub async fn user_list(&self, tenant: &str) -> DbResult<Vec<User>> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE tenant = $1 ORDER BY username LIMIT {USER_LIST_MAX}"
        );
        let rows: Vec<UserRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(User::try_from).collect()
    }

    pub async fn user_get(&self, tenant: &str, username: &str) -> DbResult<Option<User>> {
        Ok(self
            .user_credentials(tenant, username)
            .await?
            .map(|(user, _)| user))
    }

    /// The user and its password hash.
    pub async fn user_credentials(
        &self,
        tenant: &str,
        username: &str,
    ) -> DbResult<Option<(User, String)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            user: UserRow,
            password_hash: String,
        }
        if tenant.contains('\0') || username.contains('\0') {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {USER_COLUMNS}, password_hash FROM users WHERE tenant = $1 AND username = $2"
        );
        let row: Option<Row> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(username)
            .fetch_optional(pool)
            .await?);
        row.map(|r| Ok((User::try_from(r.user)?, r.password_hash)))
            .transpose()
    }

    /// Deletes a user and ends its sessions, in one transaction; false if
    /// there was no such user.
    pub async fn user_delete(&self, tenant: &str, username: &str, now: Millis) -> DbResult<bool> {
        let gone = crate::audit::audited_tx!(self, |tx| {
            sqlx::query(REVOKE_USER_SESSIONS)
                .bind(tenant)
                .bind(username)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let gone = sqlx::query("DELETE FROM users WHERE tenant = $1 AND username = $2")
                .bind(tenant)
                .bind(username)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 1 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            gone
        });
        Ok(gone == 1)
    }

    /// Gives a user another role and ends its sessions (their tokens carry
    /// the old one); false if there is no such user.
    pub async fn user_set_role(
        &self,
        tenant: &str,
        username: &str,
        role: Role,
        now: Millis,
    ) -> DbResult<bool> {
        self.user_update(
            tenant,
            username,
            "UPDATE users SET role = $3, updated_at = $4 WHERE tenant = $1 AND username = $2",
            role.as_str(),
            now,
        )
        .await
    }

    /// Sets a user's password hash and ends its sessions.
    pub async fn user_set_password(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        now: Millis,
    ) -> DbResult<bool> {
        self.user_update(
            tenant,
            username,
            "UPDATE users SET password_hash = $3, updated_at = $4 WHERE tenant = $1 AND username = $2",
            password_hash,
            now,
        )
        .await
    }

    async fn user_update(
        &self,
        tenant: &str,
        username: &str,
        update: &str,
        value: &str,
        now: Millis,
    ) -> DbResult<bool> {
        let changed = crate::audit::audited_tx!(self, |tx| {
            let changed = sqlx::query(update)
                .bind(tenant)
                .bind(username)
                .bind(value)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(REVOKE_USER_SESSIONS)
                .bind(tenant)
                .bind(username)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if changed == 1 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            changed
        });
        Ok(changed == 1)
    }

    pub async fn session_insert(&self, session: &Session) -> DbResult<()> {
        storable("source", &session.source)?;
        let resource = format!("/api/v1/auth/sessions/{}", session.id);
        crate::audit::audited_tx!(self, |tx| {
            sqlx::query(
                "INSERT INTO user_sessions (id, tenant, username, created_at, expires_at, source) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&session.id)
            .bind(&session.tenant)
            .bind(&session.username)
            .bind(session.created_at)
            .bind(session.expires_at)
            .bind(&session.source)
            .execute(&mut *tx)
            .await?;
            crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
        });
        Ok(())
    }

    /// Whether the session is live at `now`: it exists, has not expired
    /// and was not revoked.
    pub async fn session_live(&self, id: &str, now: Millis) -> DbResult<bool> {
        let found: Option<i64> = crate::with_pool!(self, read, |pool| sqlx::query_scalar(
            "SELECT expires_at FROM user_sessions WHERE id = $1 AND revoked_at IS NULL"
        )
        .bind(id)
        .fetch_optional(pool)
        .await?);
        Ok(found.is_some_and(|expires_at| expires_at > now))
    }

    /// Ends a session of this tenant; false if it was not live.
    pub async fn session_revoke(&self, tenant: &str, id: &str, now: Millis) -> DbResult<bool> {
        let done = crate::audit::audited_tx!(self, |tx| {
            let n = sqlx::query(
                "UPDATE user_sessions SET revoked_at = $3 \
                 WHERE id = $1 AND tenant = $2 AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(tenant)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            n
        });
        Ok(done == 1)
    }

    /// Forgets sessions that ended before `before` and failure counters
    /// neither locked nor counting since then.
    pub async fn session_prune(&self, before: Millis) -> DbResult<()> {
        crate::with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM user_sessions WHERE expires_at < $1")
                .bind(before)
                .execute(pool)
                .await?;
            sqlx::query(
                "DELETE FROM login_failures WHERE last_at < $1 \
                 AND (locked_until IS NULL OR locked_until < $1)",
            )
            .bind(before)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The failure counters of these keys that exist.
    pub async fn login_failures(&self, keys: &[String]) -> DbResult<Vec<(String, FailureCount)>> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let row: Option<CountRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(
                "SELECT key, failures, window_start, last_at, locked_until \
                 FROM login_failures WHERE key = $1"
            )
            .bind(key)
            .fetch_optional(pool)
            .await?);
            if let Some(row) = row {
                found.push((row.key.clone(), row.count()));
            }
        }
        Ok(found)
    }

    /// Counts one failure for `key` at `now` in one statement (so attempts
    /// made at once are all counted); failures older than `window_ms` are
    /// forgotten first. Returns the counter as it now stands.
    pub async fn login_failure_add(
        &self,
        key: &str,
        now: Millis,
        window_ms: Millis,
    ) -> DbResult<FailureCount> {
        storable("login key", key)?;
        let row: CountRow = crate::with_pool!(self, write, |pool| sqlx::query_as(
            "INSERT INTO login_failures (key, failures, window_start, last_at) \
             VALUES ($1, 1, $2, $2) \
             ON CONFLICT (key) DO UPDATE SET \
               failures = CASE WHEN login_failures.window_start <= $3 THEN 1 \
                               ELSE login_failures.failures + 1 END, \
               window_start = CASE WHEN login_failures.window_start <= $3 THEN $2 \
                                   ELSE login_failures.window_start END, \
               last_at = $2 \
             RETURNING key, failures, window_start, last_at, locked_until"
        )
        .bind(key)
        .bind(now)
        .bind(now - window_ms)
        .fetch_one(pool)
        .await?);
        Ok(row.count())
    }

    /// Locks `key` until `until`; its count starts again after.
    pub async fn login_lock(&self, key: &str, now: Millis, until: Millis) -> DbResult<()> {
        crate::with_pool!(self, write, |pool| sqlx::query(
            "UPDATE login_failures SET locked_until = $2, failures = 0, window_start = $3 \
             WHERE key = $1"
        )
        .bind(key)
        .bind(until)
        .bind(now)
        .execute(pool)
        .await
        .map(drop)?);
        Ok(())
    }

    /// Forgets `key`'s failures (a successful login to the account).
    pub async fn login_failures_clear(&self, key: &str) -> DbResult<()> {
        crate::with_pool!(self, write, |pool| sqlx::query(
            "DELETE FROM login_failures WHERE key = $1"
        )
        .bind(key)
        .execute(pool)
        .await
        .map(drop)?);
        Ok(())
    }

    /// Takes back the failure counted up front for an attempt that
    /// succeeded.
    pub async fn login_failure_forgive(&self, key: &str) -> DbResult<()> {
        crate::with_pool!(self, write, |pool| sqlx::query(
            "UPDATE login_failures SET failures = failures - 1 WHERE key = $1 AND failures > 0"
        )
        .bind(key)
        .execute(pool)
        .await
        .map(drop)?);
        Ok(())
    }
}
