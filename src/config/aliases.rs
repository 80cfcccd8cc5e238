//! `[aliases]`: reading the table and checking the alias graph.
//!
//! Delivery follows aliases at run time, so anything that cannot work is refused at load time
//! instead: a target that nothing receives would bounce, and a loop would be caught only as a
//! hop-count failure on a live message.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use toml_edit::Value;

use super::load::{Ctx, Entry};
use super::model::AliasTarget;
use super::values::Scope;

const DISCARD: &str = "/dev/null";

struct Alias<'d> {
    entry: Entry<'d>,
    targets: Vec<(AliasTarget, Entry<'d>)>,
    /// Position in the file: loop reports name the first alias of the loop.
    order: usize,
}

pub(super) fn read_aliases(
    cx: &mut Ctx<'_>,
    e: Option<Entry<'_>>,
    scope: &Scope,
    users: &BTreeSet<String>,
) -> BTreeMap<String, Vec<AliasTarget>> {
    let Some(f) = e.and_then(|e| cx.table(&e)) else {
        return BTreeMap::new();
    };
    let mut aliases = BTreeMap::new();
    let mut written: HashMap<String, &str> = HashMap::new();
    for (order, entry) in f.entries().into_iter().enumerate() {
        let source = match read_source(entry.name, scope) {
            Ok(source) => source,
            Err(message) => {
                cx.at_key(&entry, message);
                continue;
            }
        };
        if let Some(other) = written.insert(source.clone(), entry.name) {
            cx.at_key(&entry, format!("same alias source as `{other}` (addresses are case-insensitive)"));
            continue;
        }
        let targets = read_targets(cx, &entry, &source, scope);
        aliases.insert(source, Alias { entry, targets, order });
    }
    check_targets_resolve(cx, &aliases, scope, users);
    check_loops(cx, &aliases, scope, users);
    aliases.into_iter().map(|(source, alias)| (source, alias.targets.into_iter().map(|(t, _)| t).collect())).collect()
}

fn read_source(text: &str, scope: &Scope) -> Result<String, String> {
    match text.strip_prefix('@') {
        Some(domain) => {
            let domain = scope.normalize_domain(domain)?;
            scope.check_domain(&domain)?;
            Ok(format!("@{domain}"))
        }
        None => scope.address(text),
    }
}

fn read_targets<'d>(cx: &mut Ctx<'_>, entry: &Entry<'d>, source: &str, scope: &Scope) -> Vec<(AliasTarget, Entry<'d>)> {
    if !matches!(entry.raw.value(), Some(Value::String(_) | Value::Array(_))) {
        cx.wrong_type(entry, "a target address or a list of targets");
        return Vec::new();
    }
    let elements = cx.one_or_many(entry);
    if elements.is_empty() {
        cx.at(entry, "an alias needs at least one target");
    }
    let mut targets: Vec<(AliasTarget, Entry<'d>)> = Vec::new();
    for element in elements {
        let Some(text) = cx.string(&element) else {
            continue;
        };
        match parse_target(text, source.starts_with('@'), scope) {
            Ok(target) if targets.iter().any(|(t, _)| *t == target) => cx.at(&element, "target is listed twice"),
            Ok(target) => targets.push((target, element)),
            Err(message) => cx.at(&element, message),
        }
    }
    if targets.len() > 1 {
        if let Some((_, element)) = targets.iter().find(|(t, _)| *t == AliasTarget::Discard) {
            cx.at(element, "`/dev/null` discards the mail, so it cannot be combined with other targets");
        }
    }
    targets
}

fn parse_target(text: &str, domain_source: bool, scope: &Scope) -> Result<AliasTarget, String> {
    if text == DISCARD {
        return Ok(AliasTarget::Discard);
    }
    if let Some(domain) = text.strip_prefix('@') {
        if !domain_source {
            return Err(format!("a domain target like `{text}` only works for a domain source like `@example.org`"));
        }
        let domain = scope.normalize_domain(domain)?;
        scope.check_domain(&domain)?;
        return Ok(AliasTarget::Domain(domain));
    }
    // A target outside the cluster is forwarded through the outbound queue.
    Ok(AliasTarget::Address(scope.normalize_address(text)?))
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, domain)| domain)
}

/// A local target must reach something: a user, an alias, or its domain's catch-all / domain
/// alias (which then takes over the checking).
fn check_targets_resolve(
    cx: &mut Ctx<'_>,
    aliases: &BTreeMap<String, Alias<'_>>,
    scope: &Scope,
    users: &BTreeSet<String>,
) {
    let known = |address: &str| users.contains(address) || aliases.contains_key(address);
    for alias in aliases.values() {
        for (target, element) in &alias.targets {
            let AliasTarget::Address(address) = target else {
                continue;
            };
            let domain = domain_of(address);
            if scope.is_local(domain) != Some(true) {
                continue;
            }
            let resolves = known(address)
                || scope.strip_subaddress(address).is_some_and(|base| known(&base))
                || aliases.contains_key(&format!("@{domain}"));
            if !resolves {
                cx.at(
                    element,
                    format!(
                        "`{address}` is neither a user nor an alias, and `@{domain}` has no catch-all or domain alias"
                    ),
                );
            }
        }
    }
}

#[derive(Clone)]
struct Step {
    next: String,
    /// The alias source whose entry makes this step.
    via: String,
}

struct Frame {
    state: String,
    steps: Vec<Step>,
    /// How many of `steps` the search has gone down so far.
    followed: usize,
}

/// Where mail for `state` goes next, each step with the alias that sends it there.
///
/// A state is an address, or `@domain` standing for any local part of that domain that no user
/// or alias claims (there are always such local parts, so a domain-level cycle is a real loop).
/// The lookup order mirrors delivery: exact alias, exact user, then the address without its
/// subaddress, then the domain's catch-all or domain alias.
fn successors(
    state: &str,
    aliases: &BTreeMap<String, Alias<'_>>,
    scope: &Scope,
    users: &BTreeSet<String>,
) -> Vec<Step> {
    let step = |via: &str, next: &dyn Fn(&AliasTarget) -> Option<String>| -> Vec<Step> {
        aliases.get(via).map_or_else(Vec::new, |alias| {
            alias.targets.iter().filter_map(|(t, _)| next(t)).map(|next| Step { next, via: via.to_string() }).collect()
        })
    };
    if state.starts_with('@') {
        return step(state, &|t| match t {
            AliasTarget::Address(a) => Some(a.clone()),
            AliasTarget::Domain(d) => Some(format!("@{d}")),
            AliasTarget::Discard => None,
        });
    }
    if aliases.contains_key(state) {
        // Targeting yourself while also being a user means "and keep a copy": it ends there.
        let keeps_copy = users.contains(state);
        return step(state, &|t| match t {
            AliasTarget::Address(a) if !(keeps_copy && a == state) => Some(a.clone()),
            _ => None,
        });
    }
    if users.contains(state) {
        return Vec::new();
    }
    if let Some(base) = scope.strip_subaddress(state) {
        if aliases.contains_key(&base) {
            return vec![Step { next: base.clone(), via: base }];
        }
        if users.contains(&base) {
            return Vec::new();
        }
    }
    let Some((local, domain)) = state.rsplit_once('@') else {
        return Vec::new();
    };
    step(&format!("@{domain}"), &|t| match t {
        AliasTarget::Address(a) => Some(a.clone()),
        AliasTarget::Domain(d) => Some(format!("{local}@{d}")),
        AliasTarget::Discard => None,
    })
}

/// Depth-first search from every alias source; each edge back onto the current path is a loop.
/// Iterative, because a long alias chain must not overflow the stack.
fn check_loops(cx: &mut Ctx<'_>, aliases: &BTreeMap<String, Alias<'_>>, scope: &Scope, users: &BTreeSet<String>) {
    let mut starts: Vec<&String> = aliases.keys().collect();
    starts.sort_by_key(|source| aliases[*source].order);
    let mut finished: HashSet<String> = HashSet::new();
    let mut reported: HashSet<BTreeSet<String>> = HashSet::new();
    for start in starts {
        if finished.contains(start) {
            continue;
        }
        let frame = |state: &String| Frame {
            state: state.clone(),
            steps: successors(state, aliases, scope, users),
            followed: 0,
        };
        let mut path = vec![frame(start)];
        let mut on_path: HashMap<String, usize> = HashMap::from([(start.clone(), 0)]);
        while let Some(top) = path.last_mut() {
            let Some(step) = top.steps.get(top.followed).cloned() else {
                let done = path.pop().expect("path is not empty");
                on_path.remove(&done.state);
                finished.insert(done.state);
                continue;
            };
            top.followed += 1;
            if let Some(&index) = on_path.get(&step.next) {
                // Each state of the loop, with the alias its step out went through.
                let cycle: Vec<Step> = path[index..]
                    .iter()
                    .map(|f| Step { next: f.state.clone(), via: f.steps[f.followed - 1].via.clone() })
                    .collect();
                if reported.insert(cycle.iter().map(|s| s.next.clone()).collect()) {
                    report_loop(cx, aliases, cycle);
                }
            } else if !finished.contains(&step.next) {
                on_path.insert(step.next.clone(), path.len());
                path.push(frame(&step.next));
            }
        }
    }
}

/// Names the whole cycle, starting from (and reported at) the alias of the loop that comes
/// first in the file.
/// `cycle[i].next` is the i-th state of the loop and `cycle[i].via` the alias leaving it.
fn report_loop(cx: &mut Ctx<'_>, aliases: &BTreeMap<String, Alias<'_>>, mut cycle: Vec<Step>) {
    let first = (0..cycle.len()).min_by_key(|&i| aliases[&cycle[i].via].order).unwrap_or(0);
    cycle.rotate_left(first);
    let mut chain: Vec<&str> = cycle.iter().map(|s| s.next.as_str()).collect();
    chain.push(&cycle[0].next);
    let alias = &aliases[&cycle[0].via];
    cx.at_key(&alias.entry, format!("alias loop: {}", chain.join(" -> ")));
}

#[cfg(test)]
mod tests {
    use super::super::load::testing::*;
    use super::AliasTarget;

    #[test]
    fn alias_sources_and_targets() {
        only_error(
            &aliases("\"x@example.com\" = \"alice@example.org\"\n"),
            8,
            "aliases.\"x@example.com\"",
            "not one of the cluster's domains",
        );
        only_error(
            &aliases("\"@example.com\" = \"@example.org\"\n"),
            8,
            "aliases.\"@example.com\"",
            "example.org, example.net",
        );
        // Outside targets are forwarded.
        let c = load(&aliases("\"x@example.org\" = [\"someone@gmail.com\", \"alice@example.org\"]\n")).unwrap();
        assert_eq!(c.aliases["x@example.org"][0], AliasTarget::Address("someone@gmail.com".into()));
        let error = only_error(
            &aliases("\"x@example.org\" = [\"alice@example.org\", \"bob@example.org\"]\n"),
            8,
            "aliases.\"x@example.org\"[1]",
            "neither a user nor an alias",
        );
        assert!(error.message.contains("`bob@example.org`"));
        only_error(
            &aliases("\"x@example.org\" = [\"alice@example.org\", \"/dev/null\"]\n"),
            8,
            "aliases.\"x@example.org\"[1]",
            "cannot be combined",
        );
        only_error(
            &aliases("\"x@example.org\" = \"@example.net\"\n"),
            8,
            "aliases.\"x@example.org\"",
            "only works for a domain source",
        );
        only_error(
            &aliases("\"@example.net\" = \"@gmail.com\"\n"),
            8,
            "aliases.\"@example.net\"",
            "not one of the cluster's domains",
        );
        only_error(&aliases("\"x@example.org\" = []\n"), 8, "aliases.\"x@example.org\"", "at least one target");
        only_error(&aliases("\"x@example.org\" = 7\n"), 8, "aliases.\"x@example.org\"", "expected a target address");
        only_error(
            &aliases("\"X@example.org\" = \"alice@example.org\"\n\"x@example.org\" = \"/dev/null\"\n"),
            9,
            "aliases.\"x@example.org\"",
            "same alias source as `X@example.org`",
        );
        only_error(
            &aliases("\"x@example.org\" = [\"alice@example.org\", \"Alice@example.org\"]\n"),
            8,
            "aliases.\"x@example.org\"[1]",
            "listed twice",
        );
    }

    #[test]
    fn alias_targets_resolve_through_users_aliases_subaddresses_and_catch_alls() {
        let config = load(&aliases(concat!(
            "\"x@example.org\" = [\"alice+lists@example.org\", \"y+z@example.org\"]\n",
            "\"y@example.org\" = \"Alice@Example.org\"\n",
            "\"z@example.org\" = \"anyone@example.net\"\n",
            "\"@example.net\" = \"@example.org\"\n",
            "\"w@example.org\" = \"bob@example.net\"\n",
        )))
        .unwrap();
        assert_eq!(config.aliases["y@example.org"], [AliasTarget::Address("alice@example.org".into())]);
        // With subaddressing off, alice+lists is just an unknown address.
        let text = aliases("\"x@example.org\" = \"alice+lists@example.org\"\n")
            .replace("[cluster]\n", "[cluster]\nsubaddress_separator = \"\"\n");
        only_error(&text, 9, "aliases.\"x@example.org\"", "neither a user nor an alias");
    }

    #[test]
    fn alias_loops_are_refused_with_the_cycle() {
        let text = aliases(
            "\"a@example.org\" = \"b@example.org\"\n\"b@example.org\" = [\"alice@example.org\", \"a@example.org\"]\n",
        );
        only_error(
            &text,
            8,
            "aliases.\"a@example.org\"",
            "alias loop: a@example.org -> b@example.org -> a@example.org",
        );
        only_error(
            &aliases("\"a@example.org\" = \"a@example.org\"\n"),
            8,
            "aliases.\"a@example.org\"",
            "a@example.org -> a@example.org",
        );
        let text = aliases("\"@example.org\" = \"@example.net\"\n\"@example.net\" = \"@example.org\"\n");
        only_error(&text, 8, "aliases.\"@example.org\"", "@example.org -> @example.net -> @example.org");
        only_error(
            &aliases("\"@example.net\" = \"@example.net\"\n"),
            8,
            "aliases.\"@example.net\"",
            "@example.net -> @example.net",
        );
        // A domain alias that sends one specific address back where it came from.
        let text = aliases("\"@example.net\" = \"@example.org\"\n\"x@example.org\" = \"x@example.net\"\n");
        only_error(&text, 8, "aliases.\"@example.net\"", "alias loop: x@example.net -> x@example.org -> x@example.net");
        // A catch-all whose target is caught by itself.
        only_error(
            &aliases("\"@example.org\" = \"nobody@example.org\"\n"),
            8,
            "aliases.\"@example.org\"",
            "nobody@example.org -> nobody@example.org",
        );
        // Subaddress stripping leads back into the alias.
        let text = aliases("\"a@example.org\" = [\"alice@example.org\", \"a+copy@example.org\"]\n");
        only_error(&text, 8, "aliases.\"a@example.org\"", "a@example.org -> a+copy@example.org -> a@example.org");
    }

    #[test]
    fn keeping_a_copy_is_not_a_loop() {
        let text = aliases(concat!(
            "\"alice@example.org\" = [\"alice@example.org\", \"team@example.org\"]\n",
            "\"team@example.org\" = \"/dev/null\"\n",
        ));
        let config = load(&text).unwrap();
        assert_eq!(config.aliases["alice@example.org"][0], AliasTarget::Address("alice@example.org".into()));
        // ...but going round through another alias is.
        let text = aliases(concat!(
            "\"alice@example.org\" = [\"alice@example.org\", \"t@example.org\"]\n",
            "\"t@example.org\" = \"alice@example.org\"\n",
        ));
        only_error(
            &text,
            8,
            "aliases.\"alice@example.org\"",
            "alice@example.org -> t@example.org -> alice@example.org",
        );
    }
}
