"""The network node: dispatcher (spool -> rules -> queue), workers (queue -> analysis
-> egress) and the service that runs them beside the Storage SCP. See docs/node.md."""

from ct_ai_node.node.dispatcher import Dispatcher, TickReport
from ct_ai_node.node.service import Node, scp_settings
from ct_ai_node.node.worker import Worker

__all__ = ["Dispatcher", "Node", "TickReport", "Worker", "scp_settings"]
