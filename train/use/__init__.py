"""Using what training produced: load a model in any form (classifier.py), feed it photos as validation did
(inputs.py), and the command-line tools catdog-predict, catdog-evaluate, catdog-export and catdog-report."""
