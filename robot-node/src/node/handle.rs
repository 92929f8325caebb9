//! A node running in the background, and how to stop it.

use std::sync::Arc;

use super::{Ending, NodeError, run};
use crate::config::NodeConfig;
use crate::driver::Driver;
use crate::metrics::NodeMetrics;

/// A node running in the background (the all-in-one binary and tests run several).
pub struct NodeHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Ending, NodeError>>,
}

impl NodeHandle {
    /// Shuts the node down cleanly (safe state, `offline`) and waits for it.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.await {
            Ok(outcome) => outcome.map(|_| ()),
            // The task only ends by returning; a join error means it was cancelled.
            Err(_) => Ok(()),
        }
    }

    /// Ends the node abruptly, like `kill -9`: no safe state, no `offline`, no
    /// DISCONNECT. The broker publishes the last will.
    pub fn kill(mut self) {
        self.stop.take();
        self.task.abort();
    }
}

/// Starts a node on the current runtime.
pub fn spawn(config: NodeConfig, driver: Box<dyn Driver>, metrics: Arc<NodeMetrics>) -> NodeHandle {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(config, driver, metrics, async {
        let _ = stopped.await;
    }));
    NodeHandle {
        stop: Some(stop),
        task,
    }
}
