"""The namespace lab beside the product: a small Oxide rack built in network
namespaces on one machine (`xdectl lab`), and its boundary-services responder.
It drives xdectl's library the way an operator's tools would."""
