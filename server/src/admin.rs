//! The operator's commands on organisations, keys, projects and capture
//! tokens: `sluice org`, `sluice key`, `sluice project list` and `sluice
//! token`. They work on the database directly, as `sluice project create`
//! does, so an operator can make the first key of an organisation before
//! any key exists; each change is written to the audit log as made by
//! `cli`.

use serde_json::json;

use crate::model::format_timestamp;
use crate::store::{KeyError, KeySpec, NewAuditEntry, Scope, Store, StoreConfig};

async fn open(store: &StoreConfig) -> anyhow::Result<Store> {
    Store::open(store).await
}

/// Records a change made from the command line.
async fn audit(
    store: &Store,
    organisation_id: &str,
    project_id: Option<&str>,
    action: &str,
    target: &str,
) -> anyhow::Result<()> {
    store
        .record_audit(&NewAuditEntry {
            organisation_id: organisation_id.to_string(),
            project_id: project_id.map(str::to_string),
            actor: "cli".into(),
            action: action.into(),
            target: Some(target.into()),
            status: 0,
        })
        .await?;
    Ok(())
}

/// `sluice org create`.
pub async fn create_organisation(store: &StoreConfig, name: &str) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() {
        anyhow::bail!("--name must not be empty");
    }
    let store = open(store).await?;
    let organisation = store.create_organisation(name).await?;
    let key = store
        .create_key(&KeySpec {
            organisation_id: organisation.id.clone(),
            name: format!("created with organisation {name}"),
            scope: Scope::Admin,
            projects: None,
            created_by: "cli".into(),
        })
        .await?;
    audit(
        &store,
        &organisation.id,
        None,
        "org create",
        &organisation.id,
    )
    .await?;
    store.close().await;
    println!(
        "{}",
        json!({
            "organisation_id": organisation.id,
            "name": organisation.name,
            "api_key": key.api_key,
            "key_id": key.key.id,
        })
    );
    Ok(())
}

/// `sluice org list`: one JSON object per line.
pub async fn list_organisations(store: &StoreConfig) -> anyhow::Result<()> {
    let store = open(store).await?;
    let mut after: Option<String> = None;
    loop {
        let page = store.organisations(after.as_deref(), 1000).await?;
        for organisation in &page {
            println!("{}", serde_json::to_string(organisation)?);
        }
        match page.last() {
            Some(last) if page.len() == 1000 => after = Some(last.id.clone()),
            _ => break,
        }
    }
    store.close().await;
    Ok(())
}

/// `sluice key create`: prints the key, once.
pub async fn create_key(
    store: &StoreConfig,
    organisation: &str,
    name: &str,
    scope: &str,
    projects: Vec<String>,
) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() {
        anyhow::bail!("--name must not be empty");
    }
    let Some(scope) = Scope::parse(scope) else {
        anyhow::bail!(
            "--scope must be one of {}, got {scope}",
            Scope::NAMES.join(", ")
        );
    };
    let store = open(store).await?;
    let spec = KeySpec {
        organisation_id: organisation.to_string(),
        name: name.to_string(),
        scope,
        projects: (!projects.is_empty()).then_some(projects),
        created_by: "cli".into(),
    };
    let created = match store.create_key(&spec).await {
        Ok(created) => created,
        Err(KeyError::NoOrganisation(id)) => {
            anyhow::bail!("there is no organisation {id}; `sluice org list` prints the ids")
        }
        Err(KeyError::ForeignProject(project, org)) => anyhow::bail!(
            "--project {project} is not a project of organisation {org}; `sluice project list --organisation {org}` prints them"
        ),
        Err(err @ KeyError::TooMany(_)) => anyhow::bail!(
            "{err}: `sluice key list --organisation {organisation}` shows them, `sluice key revoke KEY_ID` revokes one"
        ),
        Err(KeyError::Store(err)) => return Err(err.into()),
    };
    audit(&store, organisation, None, "key create", &created.key.id).await?;
    store.close().await;
    println!("{}", serde_json::to_string(&created)?);
    Ok(())
}

/// `sluice key list`: one JSON object per line, never the keys themselves.
pub async fn list_keys(store: &StoreConfig, organisation: &str) -> anyhow::Result<()> {
    let store = open(store).await?;
    if store.organisation(organisation).await?.is_none() {
        anyhow::bail!("there is no organisation {organisation}; `sluice org list` prints the ids");
    }
    let mut after: Option<String> = None;
    loop {
        let page = store.keys(organisation, after.as_deref(), 1000).await?;
        for key in &page {
            println!("{}", serde_json::to_string(key)?);
        }
        match page.last() {
            Some(last) if page.len() == 1000 => after = Some(last.id.clone()),
            _ => break,
        }
    }
    store.close().await;
    Ok(())
}

/// `sluice key revoke`: prints the key as it now is.
pub async fn revoke_key(store: &StoreConfig, key_id: &str) -> anyhow::Result<()> {
    let store = open(store).await?;
    let Some(key) = store.revoke_key_by_id(key_id).await? else {
        anyhow::bail!(
            "there is no key {key_id}; `sluice key list --organisation ORG` prints the ids (the id, not the key itself)"
        );
    };
    audit(&store, &key.organisation_id, None, "key revoke", &key.id).await?;
    store.close().await;
    println!("{}", serde_json::to_string(&key)?);
    Ok(())
}

/// `sluice project list`: every project, or an organisation's.
pub async fn list_projects(
    store: &StoreConfig,
    organisation: Option<String>,
) -> anyhow::Result<()> {
    let store = open(store).await?;
    let organisations = match organisation {
        Some(id) => {
            if store.organisation(&id).await?.is_none() {
                anyhow::bail!("there is no organisation {id}; `sluice org list` prints the ids");
            }
            vec![id]
        }
        None => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store.organisations(after.as_deref(), 1000).await?;
                all.extend(page.iter().map(|o| o.id.clone()));
                match page.last() {
                    Some(last) if page.len() == 1000 => after = Some(last.id.clone()),
                    _ => break,
                }
            }
            all
        }
    };
    for organisation in organisations {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .projects_of(&organisation, after.as_deref(), 1000)
                .await?;
            for project in &page {
                println!("{}", serde_json::to_string(project)?);
            }
            match page.last() {
                Some(last) if page.len() == 1000 => after = Some(last.id.clone()),
                _ => break,
            }
        }
    }
    store.close().await;
    Ok(())
}

/// Longest grace period of a rotated capture token; the API keeps to the
/// same.
const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;

/// `sluice token rotate`.
pub async fn rotate_token(
    store: &StoreConfig,
    project: &str,
    grace_seconds: u64,
) -> anyhow::Result<()> {
    if grace_seconds > MAX_GRACE_SECONDS {
        anyhow::bail!(
            "--grace-seconds must be at most {MAX_GRACE_SECONDS} (30 days), got {grace_seconds}"
        );
    }
    let store = open(store).await?;
    let Some(organisation) = store.project_organisation(project).await? else {
        anyhow::bail!("there is no project {project}; `sluice project list` prints the ids");
    };
    let valid_until =
        format_timestamp(chrono::Utc::now() + chrono::Duration::seconds(grace_seconds as i64));
    let (token, _) = store
        .rotate_capture_token(project, &valid_until)
        .await?
        .ok_or_else(|| anyhow::anyhow!("project {project} was deleted meanwhile"))?;
    audit(
        &store,
        &organisation,
        Some(project),
        "token rotate",
        project,
    )
    .await?;
    store.close().await;
    println!(
        "{}",
        json!({"capture_token": token, "previous_valid_until": valid_until})
    );
    Ok(())
}
