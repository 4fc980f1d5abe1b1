-- IHE IOCM (Imaging Object Change Management) rejection for Orthanc, which has no IOCM of its own.
--
-- When ainode re-analyses a study (a late instance re-opened it), it sends the new result objects
-- (SEG, SR, GSPS, key images) and then an IOCM Rejection Note: a Key Object Selection document
-- whose title is a rejection reason (CID 7011) and whose evidence lists the objects it replaced. This script makes Orthanc act on
-- such a note the way an IOCM Image Manager does: the referenced instances are deleted, so viewers
-- show only the current results. The note itself is kept as the record of the change.
--
-- Install: add this file to Orthanc's "LuaScripts" list and restart Orthanc.

local KEY_OBJECT_SELECTION = '1.2.840.10008.5.1.4.1.1.88.59'
local REJECTION_REASONS = {   -- CID 7011 Rejected for Quality Reasons and siblings
  ['113001'] = true,  -- Rejected for Quality Reasons
  ['113037'] = true,  -- Rejected for Patient Safety Reasons
  ['113038'] = true,  -- Incorrect Modality Worklist Entry
  ['113039'] = true,  -- Data Retention Policy Expired
}

local function rejection_reason(kos)
  local title = kos['ConceptNameCodeSequence']
  if title == nil or title[1] == nil then return nil end
  if title[1]['CodingSchemeDesignator'] ~= 'DCM' then return nil end
  local code = title[1]['CodeValue']
  if REJECTION_REASONS[code] then return code end
  return nil
end

local function referenced_instances(kos)
  local uids = {}
  for _, study in ipairs(kos['CurrentRequestedProcedureEvidenceSequence'] or {}) do
    for _, series in ipairs(study['ReferencedSeriesSequence'] or {}) do
      for _, sop in ipairs(series['ReferencedSOPSequence'] or {}) do
        table.insert(uids, sop['ReferencedSOPInstanceUID'])
      end
    end
  end
  return uids
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['SOPClassUID'] ~= KEY_OBJECT_SELECTION then return end
  local kos = ParseJson(RestApiGet('/instances/' .. instanceId .. '/tags?simplify'))
  local reason = rejection_reason(kos)
  if reason == nil then return end  -- an ordinary key-image note
  for _, uid in ipairs(referenced_instances(kos)) do
    for _, found in ipairs(ParseJson(RestApiPost('/tools/lookup', uid))) do
      if found['Type'] == 'Instance' then
        RestApiDelete('/instances/' .. found['ID'])
        print('IOCM: instance ' .. found['ID'] .. ' rejected (' .. reason .. ')')
      end
    end
  end
end
