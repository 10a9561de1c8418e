//! A table pulled whole: a table without a primary key (read by the sender from one snapshot),
//! or any table under `replace`. The rows go into a stage as they come and into the table in one
//! transaction once every one is here ([`crate::Store::swap_stage`]): an interrupted pull leaves
//! the table as it was, and starts over (there is no key to resume after).

use super::pull::{
    Pass, Position, TableJob, TableSummary, adopt_remote_transfer, prepare_table, pulled_columns,
    unfinished_remote_transfer,
};
use crate::agent::Agent;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::pull::PullEvent;
use crate::session::receiver::Client;

impl Agent {
    /// Pulls `job.schema` whole under `strategy` (`append` or `replace`).
    pub(super) async fn pull_whole(
        &self,
        client: &mut Client,
        job: &TableJob<'_>,
        strategy: ConflictStrategy,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<TableSummary> {
        let TableJob {
            connection,
            schema,
            options,
            ..
        } = *job;
        let store = &self.store;
        let started = std::time::Instant::now();
        let columns = pulled_columns(schema, options);
        let (created_table, columns) =
            prepare_table(store, connection.id, schema, &columns, options).await?;
        // Nothing of an interrupted whole pull is kept: its stage is made anew.
        store.clear_checkpoint(connection.id, &schema.name).await?;
        let stage = store.open_stage(connection.id, schema, &columns).await?;
        let remote_transfer =
            unfinished_remote_transfer(store, connection.id, &schema.name).await?;
        let transfer = self
            .start_receive_transfer(connection, &schema.name, strategy, client.transport)
            .await?;
        let mut facts = serde_json::json!({ "whole": true });
        if job.estimated_rows > 0 {
            facts["estimated_rows"] = job.estimated_rows.into();
        }
        if !options.exclude_columns.is_empty() {
            facts["exclude_columns"] = serde_json::json!(options.exclude_columns);
        }
        store.merge_transfer_metadata(transfer.id, facts).await?;
        if let Some(remote) = &remote_transfer {
            adopt_remote_transfer(store, transfer.id, &mut None, remote, serde_json::json!({}))
                .await?;
        }
        let mut summary = TableSummary {
            table: schema.name.clone(),
            created_table,
            transfer_id: transfer.id,
            transport: client.transport.to_string(),
            ..TableSummary::default()
        };
        let pass = Pass {
            columns: &columns,
            strategy: ConflictStrategy::Append,
            key_filter: None,
            cursor: None,
            keys_only: false,
            into: Some(&stage),
            split: None,
            checkpoint: None,
        };
        let mut position = Position {
            after: None,
            remote_transfer,
        };
        let mut outcome = self
            .pull_rows(client, job, &pass, on_event, &mut position, &mut summary)
            .await;
        if outcome.is_ok() && summary.truncated {
            outcome = Err(Error::invalid(
                "table",
                format!(
                    "the sender's record limit cut {:?}, which is pulled whole: it is kept whole \
                     or not at all, so nothing changed here",
                    schema.name
                ),
            ));
        }
        let outcome = match outcome {
            Ok(()) => {
                store
                    .swap_stage(
                        connection.id,
                        schema,
                        &columns,
                        strategy == ConflictStrategy::Replace,
                    )
                    .await
            }
            Err(err) => Err(err),
        };
        // The batches moved the table's checkpoint as they went into the stage: a whole pull
        // has nothing to resume from.
        let _ = store.clear_checkpoint(connection.id, &schema.name).await;
        self.metrics
            .table_pulled(outcome.is_ok(), started.elapsed().as_secs_f64());
        match outcome {
            Ok(swapped) => {
                summary.created = swapped.inserted;
                summary.updated = 0;
                summary.skipped = 0;
                summary.deleted = swapped.deleted;
                store
                    .merge_transfer_metadata(
                        transfer.id,
                        serde_json::json!({ "rows_deleted": swapped.deleted }),
                    )
                    .await?;
                store.complete_transfer(transfer.id, self.now()).await?;
                Ok(summary)
            }
            Err(err) => {
                super::pull::mark_if_denied(store, transfer.id, &err).await;
                let _ = store.drop_stage(connection.id, &schema.name).await;
                let _ = store
                    .fail_transfer(transfer.id, &err.to_string(), self.now())
                    .await;
                Err(err)
            }
        }
    }
}
