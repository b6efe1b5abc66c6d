//! Operators: synchronous state machines, one per view, that turn accepted
//! events into view rows. They never touch the network, the disk or the
//! clock, so they are tested without a runtime; the async shell in
//! [`crate::runtime`] feeds them and makes their output durable.
//!
//! Registration is the one explicit list in [`registry`].

pub mod events;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::config::Settings;
use crate::event::Event;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operator {view} cannot build its rows: {source}")]
    Arrow {
        view: &'static str,
        source: arrow::error::ArrowError,
    },
}

/// A view-maintaining state machine.
pub trait Operator: Send {
    /// The view (and DataFusion table) this operator maintains.
    fn view(&self) -> &'static str;
    /// Arrow schema of the view: a public contract (metrics.md).
    fn schema(&self) -> SchemaRef;
    /// Folds one accepted, deduplicated event, in stream order.
    fn apply(&mut self, event: &Event);
    /// Rows to append for the events applied since the last call.
    fn take_rows(&mut self) -> Result<Option<RecordBatch>, OperatorError>;
}

/// Every operator, in one explicit list.
pub fn registry(_settings: &Settings) -> Vec<Box<dyn Operator>> {
    vec![Box::new(events::EventsArchive::new())]
}
