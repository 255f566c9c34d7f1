"""Where carpool's actors live in Ray: their namespace and the controller's name.

A module of its own, free of torch and of the control plane, so that a client
finding the running controller imports neither (that import costs seconds).
"""

NAMESPACE = "carpool"
CONTROLLER_NAME = "carpool-controller"
