//! `dbsync admin-tokens ...`: bearer tokens for the admin JSON API.

use clap::Subcommand;

use super::Context;
use super::output;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a token (printed once); its actions are audited as admin:<name>
    Create {
        /// Unique name, e.g. the operator or the tool that will use it
        name: String,
    },
    /// List tokens (never the tokens themselves)
    List,
    /// Revoke a token; it stops working at once
    Revoke {
        /// Token name
        name: String,
    },
}

pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create { name } => {
            let (created, token) = ctx
                .store
                .create_admin_token(&name, &ctx.actor, ctx.now())
                .await?;
            if ctx.json {
                return output::print_json(&serde_json::json!({
                    "admin_token": created, "token": token.expose(),
                    "notice": "the token is shown only once; store it now",
                }));
            }
            println!(
                "Admin token {:?} created. Shown only this once; store it now:",
                created.name
            );
            println!();
            println!("    {}", token.expose());
            println!();
            println!("Use it as: Authorization: Bearer <token>");
            Ok(())
        }
        Command::List => {
            let tokens = ctx.store.list_admin_tokens().await?;
            if ctx.json {
                return output::print_json(&tokens);
            }
            let rows = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        format!("{}…", t.token_prefix),
                        output::time(Some(t.created_at)),
                        output::time(t.last_used_at),
                        if t.revoked_at.is_some() {
                            "revoked".into()
                        } else {
                            "active".into()
                        },
                    ]
                })
                .collect();
            output::print_rows(
                &["NAME", "TOKEN", "CREATED", "LAST USED", "STATUS"],
                rows,
                "No admin tokens.",
            );
            Ok(())
        }
        Command::Revoke { name } => {
            let revoked = ctx
                .store
                .revoke_admin_token(&name, &ctx.actor, ctx.now())
                .await?;
            if ctx.json {
                return output::print_json(&revoked);
            }
            println!("Admin token {:?} revoked.", revoked.name);
            Ok(())
        }
    }
}
