//! QUOTA (RFC 9208) with the STORAGE resource. Each user has one quota root, `""`, covering all
//! of their mailboxes, with the limit from the config (`[users."…"] quota`); a user without one
//! has no quota root. The limit belongs to the operator, so SETQUOTA is refused.

use super::parse::Token;
use super::session::{no, Reply};
use super::ImapContext;
use crate::net::Conn;

/// The account's limit in bytes, if it has one.
pub(super) fn limit(ctx: &ImapContext, acct: u32) -> Result<Option<u64>, Reply> {
    if ctx.quotas.is_empty() {
        return Ok(None);
    }
    let account = ctx.store.account(acct).map_err(no)?;
    Ok(account.and_then(|a| ctx.quotas.get(&a.address).copied()))
}

/// Refuses an APPEND or COPY that would take the account over its limit (RFC 9208 §5.1).
pub(super) fn check(ctx: &ImapContext, acct: u32, adding: u64) -> Result<(), Reply> {
    let Some(limit) = limit(ctx, acct)? else { return Ok(()) };
    let used = ctx.store.usage(acct).map_err(no)?;
    if used.saturating_add(adding) > limit {
        return Err(Reply::No("[OVERQUOTA] Storage quota exceeded".into()));
    }
    Ok(())
}

/// `(STORAGE used limit)` in units of 1024 octets (RFC 9208 §5.1), usage rounded up.
fn resources(ctx: &ImapContext, acct: u32, limit: u64) -> Result<String, Reply> {
    let used = ctx.store.usage(acct).map_err(no)?;
    Ok(format!("(STORAGE {} {})", used.div_ceil(1024), limit / 1024))
}

/// GETQUOTAROOT mailbox (RFC 9208 §4.1.2).
pub(super) fn getquotaroot(
    ctx: &ImapContext,
    acct: u32,
    names: super::names::Names,
    args: &[Token],
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let [arg] = args else { return Err(Reply::Bad("Syntax: GETQUOTAROOT mailbox".into())) };
    let name = arg.astring().ok_or_else(|| Reply::Bad("Syntax: GETQUOTAROOT mailbox".into()))?;
    let info = ctx.store.mailbox_by_name(acct, &name).map_err(no)?;
    let Some(info) = info else { return Err(Reply::No("[NONEXISTENT] No such mailbox".into())) };
    match limit(ctx, acct)? {
        Some(limit) => {
            let res = resources(ctx, acct, limit)?;
            conn.write(
                format!("* QUOTAROOT {} \"\"\r\n* QUOTA \"\" {res}\r\n", names.show(&info.mailbox.name)).as_bytes(),
            );
        }
        None => conn.write(format!("* QUOTAROOT {}\r\n", names.show(&info.mailbox.name)).as_bytes()),
    }
    Ok(Some("GETQUOTAROOT completed".into()))
}

/// GETQUOTA root (RFC 9208 §4.1.1).
pub(super) fn getquota(ctx: &ImapContext, acct: u32, args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
    let [arg] = args else { return Err(Reply::Bad("Syntax: GETQUOTA root".into())) };
    let root = arg.astring().ok_or_else(|| Reply::Bad("Syntax: GETQUOTA root".into()))?;
    match limit(ctx, acct)? {
        Some(limit) if root.is_empty() => {
            let res = resources(ctx, acct, limit)?;
            conn.write(format!("* QUOTA \"\" {res}\r\n").as_bytes());
            Ok(Some("GETQUOTA completed".into()))
        }
        _ => Err(Reply::No("[NONEXISTENT] No such quota root".into())),
    }
}

/// SETQUOTA (RFC 9208 §4.1.3): limits come from the config file shared by every node.
pub(super) fn setquota(args: &[Token]) -> Result<Option<String>, Reply> {
    match args {
        [root, Token::List(_)] if root.astring().is_some() => {
            Err(Reply::No("[NOPERM] Quotas are set in the server's configuration".into()))
        }
        _ => Err(Reply::Bad("Syntax: SETQUOTA root (resource limit ...)".into())),
    }
}
