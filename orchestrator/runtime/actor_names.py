"""Where carpool's actors live in Ray: their namespace and the controller's name.

A module of its own, free of torch and of the control plane, so that a client
finding the running controller imports neither (that import costs seconds).
"""

NAMESPACE = "carpool"
CONTROLLER_NAME = "carpool-controller"

# `carpool serve`'s Ray Serve application, and its record in the state directory
# (URL, key file, bases): present while it runs, so the controller knows to tell it
# of each job that succeeds.
SERVE_APP = "carpool"
SERVING_RECORD = "serve/serving.json"
