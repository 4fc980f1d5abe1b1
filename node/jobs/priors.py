"""A patient's prior studies for a job whose route asks for them (``priors:``): found at the
route's source by C-FIND or QIDO-RS (same Patient ID, earlier Study Date within the age limit,
the current series' modality), the most recent first, fetched into the job (C-GET or WADO-RS:
never stored, never routed), de-identified with the same profile and the same patient pseudonym
— so their dates move by the same offset and the interval survives — and handed to the algorithm
as :class:`ainode_sdk.base.Prior` volumes with their intervals in days.
"""

from __future__ import annotations

import datetime
import logging
from collections import defaultdict

from pydicom import Dataset

from ainode_sdk.base import Prior
from node.deid import InstanceDeidentifier
from node.jobs.retrieve import Holdings, Retriever, StudyQuery
from node.jobs.volume import load_volume
from node.settings.routes import Priors

logger = logging.getLogger(__name__)


def _date(value: object) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(value)[:8], "%Y%m%d").date()
    except ValueError:
        return None


def fetch_priors(
    holdings: Holdings, priors: Priors, original: Dataset, deidentified: Dataset, deid: InstanceDeidentifier
) -> tuple[Prior, ...]:
    """The priors of the study whose first instance is ``original`` (received) and
    ``deidentified`` (as the algorithm sees it); empty when the patient has none.

    Raises
    ------
    RetrieveError
        The source could not be queried or did not send a prior (transient: the job is retried).
    """
    patient, day = str(original.get("PatientID", "")).strip(), _date(original.get("StudyDate", ""))
    today = _date(deidentified.get("StudyDate", ""))
    if not patient or day is None or today is None:
        logger.info("no prior looked for: the study has no Patient ID or no Study Date to compare")
        return ()
    modality = str(original.get("Modality", ""))
    retriever = Retriever(holdings, priors.source)
    query = StudyQuery(patient_id=patient, modality=modality or None,
                       since=day - datetime.timedelta(days=priors.max_age_days),
                       until=day - datetime.timedelta(days=1))  # fmt: skip
    found = [m for m in retriever.find(query) if m.study_instance_uid != str(original.StudyInstanceUID)]
    chosen = sorted(found, key=lambda m: m.study_date, reverse=True)[: priors.count]
    out = []
    for match in chosen:
        by_series: dict[str, list[Dataset]] = defaultdict(list)
        for ds in retriever.datasets(match):
            if str(ds.get("Modality", "")) == modality:
                by_series[str(ds.SeriesInstanceUID)].append(ds)
        if not by_series:
            continue
        series = max(by_series.values(), key=len)  # the prior's largest series of the modality
        for ds in series:
            deid(ds)
        then = _date(series[0].get("StudyDate", ""))
        if then is None:
            continue
        volume, _slices = load_volume(series)
        out.append(Prior(volume, float((today - then).days)))
    logger.info("priors found: %d", len(out))
    return tuple(out)
