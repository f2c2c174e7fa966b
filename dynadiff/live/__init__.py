"""Live decoding: an image for each trial as soon as its fMRI window has been acquired (``live.py``).

- :mod:`.causal`: preprocessing that uses no volume from the future;
- :mod:`.watch`: volumes arriving as files in a folder, trial onsets from a design or a growing file;
- :mod:`.replay`: a recorded run written as such files at the scanner's pace;
- :mod:`.record`: the outputs (PNGs, ``latency.csv``, ``trials.json``), written so that nothing is lost;
- :mod:`.server`: the page that shows them as they arrive (its HTML, CSS and JS in ``page/``);
- :mod:`.session`: the loop that ties them to the decoder (:mod:`.decoder`);
- :mod:`.offline`: the same trials decoded offline, with the offline or the causal preprocessing.
"""
